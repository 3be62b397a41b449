//! Limits that hold against slow or greedy clients, and native TLS.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

fn short_timeouts(nats: &NatsServer) -> cmc_forwarder::settings::Settings {
    let mut settings = test_settings(nats);
    settings.server.request_timeout = Duration::from_secs(1);
    settings
}

async fn connect(app: &TestApp) -> TcpStream {
    let addr = app.address.trim_start_matches("http://").to_owned();
    TcpStream::connect(addr).await.unwrap()
}

/// Reads until the server closes the connection (or `WAIT` passes); returns what was read.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_disconnected_in_time() {
    let nats = NatsServer::start().await;
    let app = spawn_app_with(short_timeouts(&nats)).await;
    let mut stream = connect(&app).await;
    let started = Instant::now();

    let head = b"POST /webhooks/cmc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
    for byte in head.iter().cycle().take(200) {
        if stream.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let _ = read_to_close(&mut stream).await;

    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(2500),
        "connection held for {elapsed:?}"
    );
}

#[tokio::test]
async fn a_client_trickling_its_body_gets_408_and_nothing_is_published() {
    let nats = NatsServer::start().await;
    let app = spawn_app_with(short_timeouts(&nats)).await;
    let mut sub = app.subscribe(">").await;
    let body = fixture("deliveries-queued", Enc::Json);
    let mut stream = connect(&app).await;
    let started = Instant::now();

    let head = format!(
        "POST /webhooks/cmc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let trickle = async {
        for byte in &body[..body.len() - 1] {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), trickle).await;
    let response = read_to_close(&mut stream).await;

    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(
        response.contains("\"error\":\"request_timeout\""),
        "{response}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_silent(&mut sub).await;
    assert!(app.stream_messages().await.is_empty());
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_timeout() {
    let nats = NatsServer::start().await;
    let app = spawn_app_with(short_timeouts(&nats)).await;
    let mut stream = connect(&app).await;
    let started = Instant::now();

    let _ = read_to_close(&mut stream).await;

    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(2500), "{elapsed:?}");
}

#[tokio::test]
async fn requests_beyond_max_in_flight_get_503_at_once() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.server.max_in_flight = 1;
    let app = spawn_app_with(settings).await;
    // One request holds the only slot by sending its body slowly.
    let mut slow = connect(&app).await;
    slow.write_all(
        b"POST /webhooks/cmc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let response = app.post_fixture("deliveries-queued", Enc::Json).await;

    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());
    assert_eq!(json(response).await["error"], "unavailable");
    assert!(started.elapsed() < Duration::from_secs(1));
    drop(slow);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        app.post_fixture("deliveries-queued", Enc::Json)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_for_a_free_slot() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.server.max_connections = 1;
    let app = spawn_app_with(settings).await;
    let holder = connect(&app).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let waiting = tokio::time::timeout(
        Duration::from_millis(500),
        app.post_fixture("deliveries-queued", Enc::Json),
    )
    .await;
    assert!(
        waiting.is_err(),
        "a second connection was served while the cap was reached"
    );

    drop(holder);
    let response = app.post_fixture("deliveries-queued", Enc::Json).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn native_tls_serves_https_with_tls_1_2_and_1_3() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let mut settings = test_settings(&nats);
    settings.server.tls_cert_file = Some(cert_path);
    settings.server.tls_key_file = Some(key_path);
    let app = spawn_app_with(settings).await;
    let mut sub = app.subscribe("cmc.>").await;
    let url = app
        .webhook_url()
        .replace("http://127.0.0.1", "https://localhost");
    let root = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap();

    for version in [
        reqwest::tls::Version::TLS_1_2,
        reqwest::tls::Version::TLS_1_3,
    ] {
        let client = reqwest::Client::builder()
            .add_root_certificate(root.clone())
            .min_tls_version(version)
            .max_tls_version(version)
            .resolve(
                "localhost",
                app.address.trim_start_matches("http://").parse().unwrap(),
            )
            .timeout(WAIT)
            .build()
            .unwrap();
        let response = client
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(fixture("deliveries-queued", Enc::Form))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{version:?}: {e}"));
        assert_eq!(response.status(), 200, "{version:?}");
        assert_eq!(
            receive(&mut sub, 1).await[0].subject.as_str(),
            "cmc.deliveries.queued"
        );
    }

    // Plain HTTP on the TLS port gets no answer.
    let plain = app
        .http
        .post(app.webhook_url())
        .header("content-type", "application/json")
        .body(fixture("deliveries-queued", Enc::Json))
        .send()
        .await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));
}

/// A JSON webhook of deliveries whose encoded size is close to, and at most, `size` bytes.
fn body_of_about(tag: &str, size: usize) -> Vec<u8> {
    let entries: Vec<serde_json::Value> = (0..100)
        .map(|i| {
            serde_json::json!({
                "status": "queued",
                "messageId": format!("<{tag}.{i}@mail.example.com>"),
                "from": "sender@example.com",
                "to": format!("user{i}@example.net"),
                "created": "2026-12-01 12:34:56",
                "apiData": format!("{tag}-{i}"),
                "note": "n".repeat(size / 100 - 250),
            })
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "event_type": "deliveries",
        "server_composition": "pro",
        "event": {"deliveries": entries},
    }))
    .unwrap();
    assert!(
        body.len() <= size && body.len() > size * 9 / 10,
        "{}",
        body.len()
    );
    body
}

/// Opens a request that announces a body of `length` bytes and sends one byte of it, so the
/// service reserves twice `length` in its byte budget and holds it.
async fn hold_budget(app: &TestApp, length: u64) -> TcpStream {
    let mut stream = connect(app).await;
    let head = format!(
        "POST /webhooks/cmc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream
}

/// README "Limits": a request counts as twice its body while the body is read and decoded,
/// then as its outgoing size. With a budget of 4 × b and one request holding 2 × b while its
/// body arrives, a complete body of b fits; once a second slow request holds the other 2 × b,
/// the same body is refused with 503 and `Retry-After`.
#[tokio::test]
async fn the_byte_budget_counts_each_body_twice_while_it_is_read_and_decoded() {
    const B: u64 = 1024 * 1024;
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    // 64 KiB of slack for the rounding to whole KiB; less than any body here.
    settings.server.max_in_flight_bytes = 4 * B + 64 * 1024;
    settings.server.max_body_bytes = 2 * B;
    let app = spawn_app_with(settings).await;

    let first = hold_budget(&app, B).await;
    let fits = app
        .post("application/json", body_of_about("fits", B as usize))
        .await;
    assert_eq!(
        fits.status(),
        200,
        "2 × b held, 2 × b free: {}",
        fits.text().await.unwrap()
    );

    let second = hold_budget(&app, B).await;
    let refused = app
        .post("application/json", body_of_about("refused", B as usize))
        .await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().get("retry-after").is_some());
    assert_eq!(json(refused).await["error"], "unavailable");

    drop((first, second));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = app
        .post("application/json", body_of_about("after", B as usize))
        .await;
    assert_eq!(after.status(), 200);
    assert_eq!(app.stream_messages().await.len(), 200);
}

/// Issue 29: a body announced by `Content-Length` reserves exactly twice its length, not a
/// step of 256 KiB: a batch of b bytes (b well under 128 KiB) is admitted under a budget of a
/// little more than 2 × b, its outgoing size included.
#[tokio::test]
async fn a_batch_fits_a_budget_of_twice_its_size() {
    const B: u64 = 100_000;
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.server.max_in_flight_bytes = 2 * B + 16 * 1024;
    let app = spawn_app_with(settings).await;

    let response = app
        .post("application/json", body_of_about("small", B as usize))
        .await;

    let status = response.status();
    assert_eq!(status, 200, "{}", response.text().await.unwrap());
    assert_eq!(app.stream_messages().await.len(), 100);
}

/// Issue 29: a request announcing 1 KiB holds 2 KiB of the budget while its body arrives. A
/// budget of 48 KiB holds 20 such requests and still admits a small batch; 4 more fill it,
/// and the batch is refused with 503.
#[tokio::test]
async fn a_request_of_1_kib_holds_2_kib_of_the_budget() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.server.max_in_flight_bytes = 48 * 1024;
    let app = spawn_app_with(settings).await;
    let batch = fixture("deliveries-queued", Enc::Json);
    assert!(batch.len() <= 1024, "{}", batch.len());

    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(hold_budget(&app, 1024).await);
    }
    let fits = app.post("application/json", batch.clone()).await;
    let status = fits.status();
    assert_eq!(
        status,
        200,
        "20 × 2 KiB held of 48 KiB: {}",
        fits.text().await.unwrap()
    );

    for _ in 0..4 {
        held.push(hold_budget(&app, 1024).await);
    }
    let refused = app.post("application/json", batch).await;
    assert_eq!(refused.status(), 503, "24 × 2 KiB held of 48 KiB");
    assert_eq!(json(refused).await["error"], "unavailable");
}

/// Sends `head` and `body` on a plain blocking socket, writing everything before reading, as
/// Python's http.client does; returns the response as read to the close, or what went wrong.
fn write_all_then_read(address: &str, head: String, body: Vec<u8>) -> Result<String, String> {
    use std::io::{Read, Write};
    let addr = address.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    stream
        .write_all(head.as_bytes())
        .map_err(|e| format!("writing the head: {e}"))?;
    stream
        .write_all(&body)
        .map_err(|e| format!("writing the body: {e}"))?;
    let mut out = Vec::new();
    match stream.read_to_end(&mut out) {
        Ok(_) => Ok(String::from_utf8_lossy(&out).into_owned()),
        Err(e) if !out.is_empty() => Ok(format!("{}\n(then {e})", String::from_utf8_lossy(&out))),
        Err(e) => Err(format!("reading the response: {e}")),
    }
}

/// A request of `content_type` with a body of `size` bytes to `path`, `extra` header lines
/// added, sent by [`write_all_then_read`] in a blocking thread.
async fn send_whole(
    app: &TestApp,
    path: &str,
    content_type: &str,
    extra: &str,
    size: usize,
) -> Result<String, String> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{extra}Content-Length: {size}\r\n\r\n"
    );
    let body = vec![b'a'; size];
    let address = app.address.clone();
    tokio::task::spawn_blocking(move || write_all_then_read(&address, head, body))
        .await
        .unwrap()
}

/// Issue 29: a client that writes its whole body before it reads (Python's http.client) must
/// read the early `413`, not a broken pipe or a reset: the service reads and discards what is
/// still coming (a bounded linger) before it closes.
#[tokio::test]
async fn a_client_writing_its_whole_body_first_reads_the_early_413() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.server.max_body_bytes = 1024 * 1024;
    settings.inbound.max_body_bytes = 1024 * 1024;
    let app = spawn_app_with(settings).await;

    for (path, size) in [
        ("/webhooks/cmc", 8 << 20),
        ("/webhooks/cmc/inbound", 2 << 20),
    ] {
        for attempt in 0..3 {
            let response = send_whole(&app, path, "application/json", "", size).await;
            let response = response.unwrap_or_else(|e| panic!("{path} #{attempt}: {e}"));
            assert!(
                response.starts_with("HTTP/1.1 413"),
                "{path} #{attempt}: {response}"
            );
            assert!(
                response.contains("\"error\":\"payload_too_large\""),
                "{path} #{attempt}: {response}"
            );
        }
    }
}

/// Issue 29: a chunked body (no `Content-Length`) is refused with `413` once it passes
/// `server.max_body_bytes`, with the rest still coming: the client reads the answer too.
#[tokio::test]
async fn a_client_writing_its_whole_chunked_body_first_reads_the_413() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.server.max_body_bytes = 1024 * 1024;
    let app = spawn_app_with(settings).await;
    let size = 8usize << 20;
    let mut body = format!("{size:x}\r\n").into_bytes();
    body.extend(std::iter::repeat_n(b'a', size));
    body.extend_from_slice(b"\r\n0\r\n\r\n");

    for attempt in 0..3 {
        let head = "POST /webhooks/cmc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned();
        let address = app.address.clone();
        let body = body.clone();
        let response =
            tokio::task::spawn_blocking(move || write_all_then_read(&address, head, body))
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("#{attempt}: {e}"));
        assert!(
            response.starts_with("HTTP/1.1 413"),
            "#{attempt}: {response}"
        );
        assert!(
            response.contains("\"error\":\"payload_too_large\""),
            "#{attempt}: {response}"
        );
    }
}

/// Issue 29: the same for an early `401` (Basic credentials missing), sent before the body
/// is read.
#[tokio::test]
async fn a_client_writing_its_whole_body_first_reads_the_early_401() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.auth.basic_username = "cmc".into();
    settings.auth.basic_password = cmc_forwarder::settings::Secret::new("pw");
    let app = spawn_app_with(settings).await;

    for attempt in 0..3 {
        let response = send_whole(&app, "/webhooks/cmc", "application/json", "", 8 << 20).await;
        let response = response.unwrap_or_else(|e| panic!("#{attempt}: {e}"));
        assert!(
            response.starts_with("HTTP/1.1 401"),
            "#{attempt}: {response}"
        );
        assert!(
            response.contains("\"error\":\"unauthorized\""),
            "#{attempt}: {response}"
        );
    }
}

/// Issue 29: the same for an early `415` (an Inbound media type the service does not read),
/// sent before the body is read.
#[tokio::test]
async fn a_client_writing_its_whole_body_first_reads_the_early_415() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;

    for attempt in 0..3 {
        let response = send_whole(&app, "/webhooks/cmc/inbound", "text/plain", "", 8 << 20).await;
        let response = response.unwrap_or_else(|e| panic!("#{attempt}: {e}"));
        assert!(
            response.starts_with("HTTP/1.1 415"),
            "#{attempt}: {response}"
        );
        assert!(
            response.contains("\"error\":\"unsupported_media_type\""),
            "#{attempt}: {response}"
        );
    }
}
