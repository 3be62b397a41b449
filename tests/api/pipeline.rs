//! The delivery pipeline's limits against the real binary and real nats-server processes
//! (issue 10): memory of one large body and of sixteen at once (peak RSS from
//! `/proc/<pid>/status`), `max_entries`, concurrent large batches, a poison message in the
//! spool, and `cmc-forwarder spool drain`. Each test prints its figures.
//!
//! Run them one at a time (they measure memory and share two cores):
//! `cargo test --test api pipeline:: -- --nocapture --test-threads=1`. They run this build's
//! binary; `CMC_FORWARDER_BIN=target/release/cmc-forwarder` measures a release build.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;

const MIB: u64 = 1024 * 1024;
const STREAM: &str = "CMC_EVENTS";

/// A JSON webhook of `n` deliveries of about `size` bytes each, every one distinct.
fn body(tag: &str, n: usize, size: usize) -> Vec<u8> {
    let statuses = ["queued", "succeeded", "failed", "deferred"];
    let entries: Vec<Value> = (0..n)
        .map(|i| {
            let mut entry = json!({
                "status": statuses[i % 4],
                "messageId": format!("<{tag}.{i}@mail.example.com>"),
                "from": "sender@example.com",
                "to": format!("user{i}@example.net"),
                "subject": "Your order has shipped",
                "created": "2026-12-01 12:34:56",
                "reason": "",
                "apiData": format!("{tag}-{i}"),
            });
            let len = entry.to_string().len();
            entry["note"] = Value::String("n".repeat(size.saturating_sub(len + 10)));
            entry
        })
        .collect();
    serde_json::to_vec(&json!({
        "event_type": "deliveries",
        "server_composition": "pro",
        "event": {"deliveries": entries},
    }))
    .unwrap()
}

async fn post(http: &reqwest::Client, url: &str, body: Vec<u8>) -> (u16, Value, Option<String>) {
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("answered in time");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let id = response
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let json: Value = response.json().await.unwrap_or(Value::Null);
    if status == 503 {
        assert!(retry_after.is_some(), "503 without Retry-After");
    }
    (status, json, id)
}

fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder().timeout(timeout).build().unwrap()
}

async fn jetstream_of(url: &str) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(url)
        .await
        .unwrap();
    jetstream::new(client)
}

async fn stored_count(js: &jetstream::Context) -> u64 {
    match js.get_stream(STREAM).await {
        Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    }
}

async fn wait_stored(js: &jetstream::Context, n: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let count = stored_count(js).await;
        if count >= n || Instant::now() > deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `(Cmc-Batch-Id, Cmc-Batch-Index, Nats-Msg-Id)` of every stored message, in stream order.
async fn stored_messages(js: &jetstream::Context) -> Vec<(String, usize, String)> {
    let stream = js.get_stream(STREAM).await.unwrap();
    let state = stream.get_info().await.unwrap().state;
    if state.messages == 0 {
        return Vec::new();
    }
    futures_util::stream::iter(state.first_sequence..=state.last_sequence)
        .map(|seq| {
            let stream = &stream;
            async move { stream.get_raw_message(seq).await.unwrap() }
        })
        .buffered(64)
        .map(|m| {
            let header = |name: &str| {
                m.headers
                    .get(name)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            };
            (
                header("Cmc-Batch-Id"),
                header("Cmc-Batch-Index").parse().unwrap(),
                header("Nats-Msg-Id"),
            )
        })
        .collect()
        .await
}

/// Runs `cmc-forwarder <args>` with the service's environment for `spool_dir` and `nats_url`.
fn cli(nats_url: &str, spool_dir: &Path, args: &[&str]) -> Output {
    forwarder_command()
        .args(args)
        .env("CMC_FORWARDER__NATS__SERVERS", nats_url)
        .env("CMC_FORWARDER__NATS__CONNECT_TIMEOUT", "2s")
        .env("CMC_FORWARDER__NATS__PUBLISH_TIMEOUT", "2s")
        .env("CMC_FORWARDER__SPOOL__DIR", spool_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What the large-body tests run against: a nats-server and the real binary, ready, its
/// spool and log in a temporary directory, `nats.publish_timeout` 20 s (a 10,000-entry batch
/// on two shared cores takes seconds), and a client whose requests may take `timeout`.
struct Large {
    nats: NatsServer,
    service: Service,
    http: reqwest::Client,
    _spool: tempfile::TempDir,
}

impl Large {
    async fn start(env: &[(&str, &str)], timeout: Duration) -> Large {
        let nats = NatsServer::start().await;
        let spool = tempfile::tempdir().unwrap();
        let mut env = env.to_vec();
        env.push(("NATS__PUBLISH_TIMEOUT", "20s"));
        let mut service = Launch::service(&spool.path().join("service.log"))
            .nats(&nats.url())
            .spool(&spool.path().join("spool"))
            .settings(&env)
            .start();
        let http = client(timeout);
        service.wait_ready(&http).await;
        Large {
            nats,
            service,
            http,
            _spool: spool,
        }
    }
}

/// A nats-server's service: the real binary against it with its spool and log in a temporary
/// directory, ready, and a client bounded by [`CLIENT_TIMEOUT`].
struct Spooled {
    service: Service,
    http: reqwest::Client,
    spool_dir: PathBuf,
    /// Holds the spool and the log.
    dir: tempfile::TempDir,
}

impl Spooled {
    async fn start(nats: &NatsServer, settings: &[(&str, &str)]) -> Spooled {
        let dir = tempfile::tempdir().unwrap();
        let (spool_dir, log) = (dir.path().join("spool"), dir.path().join("service.log"));
        let mut service = Launch::service(&log)
            .nats(&nats.url())
            .spool(&spool_dir)
            .settings(settings)
            .start();
        let http = client(CLIENT_TIMEOUT);
        service.wait_ready(&http).await;
        Spooled {
            service,
            http,
            spool_dir,
            dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_large_body_is_200_within_64_mib_and_a_body_of_tiny_entries_is_413() {
    let Large {
        nats: _nats,
        service,
        http,
        _spool,
    } = Large::start(&[], Duration::from_secs(60)).await;
    let pid = service.child.id();
    let idle = vm_hwm_kib(pid) * 1024;

    let large = body("large", 10_000, 410);
    assert!(large.len() as u64 > 39 * MIB / 10 && large.len() as u64 <= 4 * MIB);
    let started = Instant::now();
    let (status, answer, _) = post(&http, &service.webhook_url(), large).await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["published"].as_u64().unwrap() + answer["spooled"].as_u64().unwrap_or(0),
        10_000
    );
    let after_large = vm_hwm_kib(pid) * 1024;

    let tiny: Vec<String> = (0..158_116)
        .map(|i| format!(r#"{{"status":"q","i":{i}}}"#))
        .collect();
    let tiny = format!(
        r#"{{"event_type":"deliveries","server_composition":"pro","event":{{"deliveries":[{}]}}}}"#,
        tiny.join(",")
    );
    assert!(tiny.len() as u64 <= 4 * MIB);
    let (status, answer, _) = post(&http, &service.webhook_url(), tiny.into_bytes()).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"], "payload_too_large");
    let after_tiny = vm_hwm_kib(pid) * 1024;
    println!(
        "[one_large_body] 10000 entries, 4 MiB: 200 in {took:?}; peak RSS idle={} MiB after_large={} MiB after_158116_tiny(413)={} MiB",
        idle / MIB,
        after_large / MIB,
        after_tiny / MIB
    );
    assert!(
        after_large <= 64 * MIB,
        "peak RSS {} MiB",
        after_large / MIB
    );
    assert!(after_tiny <= 64 * MIB, "peak RSS {} MiB", after_tiny / MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_large_bodies_at_once_get_200_or_503_and_nothing_of_a_refused_one_is_published() {
    const BUDGET: u64 = 24 * MIB;
    let budget = BUDGET.to_string();
    let Large {
        nats,
        service,
        http,
        _spool,
    } = Large::start(
        &[("SERVER__MAX_IN_FLIGHT_BYTES", &budget)],
        Duration::from_secs(90),
    )
    .await;
    let pid = service.child.id();
    let bodies: Vec<Vec<u8>> = (0..16)
        .map(|i| body(&format!("b{i}"), 2000, 2000))
        .collect();
    let url = service.webhook_url();
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { post(&http, &url, b).await })
        })
        .collect();
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for task in tasks {
        let (status, answer, id) = task.await.unwrap();
        match status {
            200 => accepted.push(id.unwrap()),
            503 => refused.push(id.unwrap()),
            other => panic!("status {other}: {answer}"),
        }
    }
    let peak = vm_hwm_kib(pid) * 1024;
    let js = jetstream_of(&nats.url()).await;
    let expected = accepted.len() as u64 * 2000;
    let count = wait_stored(&js, expected, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored = stored_messages(&js).await;
    let mut per_batch: HashMap<String, usize> = HashMap::new();
    for (batch, _, _) in &stored {
        *per_batch.entry(batch.clone()).or_default() += 1;
    }
    println!(
        "[sixteen_large_bodies] max_in_flight_bytes={} MiB: 200={} 503={} stored={count} peak RSS={} MiB",
        BUDGET / MIB,
        accepted.len(),
        refused.len(),
        peak / MIB
    );
    assert!(!accepted.is_empty(), "nothing accepted");
    for id in &refused {
        assert!(
            !per_batch.contains_key(id),
            "a refused request was published"
        );
    }
    for id in &accepted {
        assert_eq!(per_batch.get(id), Some(&2000), "batch {id} incomplete");
    }
    assert_eq!(stored.len() as u64, expected);
    assert!(
        peak <= BUDGET + 64 * MIB,
        "peak RSS {} MiB over max_in_flight_bytes + 64 MiB",
        peak / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_batches_of_10000_at_once_are_all_200_and_all_stored() {
    let Large {
        nats,
        service,
        http,
        _spool,
    } = Large::start(&[], Duration::from_secs(120)).await;
    let url = service.webhook_url();
    let started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            let b = body(&format!("four{i}"), 10_000, 100);
            tokio::spawn(async move { post(&http, &url, b).await })
        })
        .collect();
    let mut spooled = 0;
    for task in tasks {
        let (status, answer, _) = task.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        spooled += answer["spooled"].as_u64().unwrap_or(0);
    }
    let took = started.elapsed();
    let js = jetstream_of(&nats.url()).await;
    let count = wait_stored(&js, 40_000, Duration::from_secs(60)).await;
    println!(
        "[four_10000] 4 x 10000 at once: all 200 in {took:?} (spooled {spooled}), stored={count}"
    );
    assert_eq!(count, 40_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_in_the_spool_is_quarantined_and_the_rest_drains_in_order() {
    let mut nats = NatsServer::start().await;
    let Spooled {
        service,
        http,
        spool_dir,
        dir: _dir,
    } = Spooled::start(&nats, &[("SPOOL__RETRY_MAX_INTERVAL", "500ms")]).await;
    nats.stop();

    // 20 batches of 10 while NATS is down; batch 7 holds one message of ~900 KB.
    let mut ids = Vec::new();
    for b in 0..20 {
        let payload = if b == 7 {
            body("poison", 1, 900_000)
        } else {
            body(&format!("p{b:02}"), 10, 300)
        };
        let (status, answer, id) = post(&http, &service.webhook_url(), payload).await;
        assert_eq!(status, 200, "batch {b}: {answer}");
        assert_eq!(answer["published"], 0, "batch {b}: {answer}");
        ids.push(id.unwrap());
    }
    let before = cli(&nats.url(), &spool_dir, &["spool", "status", "--json"]);
    let before: Value = serde_json::from_slice(&before.stdout).unwrap();
    assert_eq!(before["messages"], 191, "{before}");
    assert_eq!(before["in_use"], true);

    // NATS comes back with a max_payload the big message no longer fits.
    let conf = nats.dir().join("small.conf");
    std::fs::write(&conf, "max_payload: 524288\n").unwrap();
    nats.args = vec!["-c".into(), conf.display().to_string()];
    nats.restart().await;
    let js = jetstream_of(&nats.url()).await;
    let count = wait_stored(&js, 190, Duration::from_secs(30)).await;
    assert_eq!(
        count,
        190,
        "the other messages drained:\n{}",
        service.log_tail()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let out = cli(&nats.url(), &spool_dir, &["spool", "status", "--json"]);
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        if status["messages"] == 0 || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["messages"], 0, "{status}");
    let quarantined = status["quarantined"].as_array().unwrap();
    assert_eq!(quarantined.len(), 1, "{status}");
    assert_eq!(quarantined[0]["subject"], "cmc.deliveries.queued");
    assert!(
        quarantined[0]["reason"]
            .as_str()
            .unwrap()
            .contains("max_payload")
            || quarantined[0]["reason"]
                .as_str()
                .unwrap()
                .contains("Payload size limit"),
        "{status}"
    );
    let human = text(&cli(&nats.url(), &spool_dir, &["spool", "status"]).stdout);
    assert!(human.contains("quarantined: 1 messages"), "{human}");
    let metrics = get_text(
        &http,
        &format!("http://127.0.0.1:{}/metrics", service.admin_port),
    )
    .await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "cmc_forwarder_spool_quarantined_messages 1"),
        "metric missing"
    );
    // In order: batch by batch, entry by entry.
    let stored = stored_messages(&js).await;
    let order: Vec<(usize, usize)> = stored
        .iter()
        .map(|(batch, index, _)| (ids.iter().position(|i| i == batch).unwrap(), *index))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "stored out of order");
    assert!(!order.iter().any(|(b, _)| *b == 7), "the poison was stored");
    // New batches are accepted again, and published directly.
    let (status, answer, _) = post(&http, &service.webhook_url(), body("after", 10, 300)).await;
    assert_eq!(
        (status, answer["published"].as_u64()),
        (200, Some(10)),
        "{answer}"
    );
    println!(
        "[poison] spooled=191 drained_in_order={} quarantined=1 reason={:?}",
        stored.len(),
        quarantined[0]["reason"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_drain_empties_a_stopped_services_spool_exactly_once_and_refuses_a_spool_in_use() {
    let mut nats = NatsServer::start().await;
    let Spooled {
        mut service,
        http,
        spool_dir,
        dir: _dir,
    } = Spooled::start(&nats, &[]).await;
    nats.stop();
    let mut ids = Vec::new();
    for b in 0..12 {
        let (status, answer, id) = post(
            &http,
            &service.webhook_url(),
            body(&format!("d{b}"), 25, 300),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["spooled"], 25, "{answer}");
        ids.push(id.unwrap());
    }
    // While the service runs on the directory, drain refuses.
    let refused = cli(&nats.url(), &spool_dir, &["spool", "drain"]);
    assert!(!refused.status.success());
    let message = text(&refused.stderr);
    assert!(message.contains("in use by another process"), "{message}");

    service.terminate().await;
    nats.restart().await;
    let started = Instant::now();
    let drained = cli(&nats.url(), &spool_dir, &["spool", "drain"]);
    let took = started.elapsed();
    assert!(
        drained.status.success(),
        "drain failed: {}{}",
        text(&drained.stdout),
        text(&drained.stderr)
    );
    let out = text(&drained.stdout);
    assert!(out.contains("published 300 messages"), "{out}");
    let status: Value = serde_json::from_slice(
        &cli(&nats.url(), &spool_dir, &["spool", "status", "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(status["messages"], 0);
    assert_eq!(status["in_use"], false);
    // What it published is kept, in case NATS loses it before its next sync: the 300
    // drained, and what the service had published itself before NATS went away.
    assert!(
        status["retained"]["records"].as_u64().unwrap() >= 300,
        "{status}"
    );
    // A second drain finds nothing to do.
    let again = cli(&nats.url(), &spool_dir, &["spool", "drain"]);
    assert!(again.status.success());
    assert!(text(&again.stdout).contains("is empty"));
    let js = jetstream_of(&nats.url()).await;
    let stored = stored_messages(&js).await;
    let mut distinct: Vec<&String> = stored.iter().map(|(_, _, id)| id).collect();
    distinct.sort();
    distinct.dedup();
    println!(
        "[spool_drain] spooled=300 drained in {took:?}: stored={} distinct={}",
        stored.len(),
        distinct.len()
    );
    assert_eq!(stored.len(), 300, "exactly once");
    assert_eq!(distinct.len(), 300);
    let order: Vec<(usize, usize)> = stored
        .iter()
        .map(|(batch, index, _)| (ids.iter().position(|i| i == batch).unwrap(), *index))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "drained out of order");
}

/// A spool directory as the previous build left it: event segments, and beside them its own
/// inbound queue (`inbound/<n>/mail.json` with `batch_id`). `spool status` counts the mail,
/// and `spool drain` sends everything once: the events, then the mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_and_inbound_queue_of_the_previous_layout_still_drain() {
    // Arrange
    let nats = NatsServer::start().await;
    let root = tempfile::tempdir().unwrap();
    let spool_dir = root.path().join("spool");
    {
        let mut spool = cmc_forwarder::spool::Spool::open(&spool_dir, 1 << 30).unwrap();
        let mut records = Vec::new();
        for i in 0..2 {
            let message = cmc_forwarder::wire::NatsMessage {
                subject: "cmc.deliveries.queued".into(),
                headers: vec![("Nats-Msg-Id".into(), format!("old-event-{i}"))],
                payload: format!("{{\"n\":{i}}}").into(),
            };
            cmc_forwarder::spool::encode_message(&mut records, &message, 0).unwrap();
        }
        spool.append(records, 2).unwrap();
    }
    let queued = spool_dir.join("inbound/00000000000000000003");
    std::fs::create_dir_all(&queued).unwrap();
    let fixture =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/inbound/json.json");
    let mail = cmc_forwarder::inbound::mail::parse_json(&std::fs::read(fixture).unwrap())
        .unwrap()
        .validate()
        .unwrap();
    std::fs::write(queued.join("mail.json"), serde_json::to_vec(&mail).unwrap()).unwrap();
    std::fs::write(queued.join("batch_id"), "old-mail").unwrap();
    let status: Value = serde_json::from_slice(
        &cli(&nats.url(), &spool_dir, &["spool", "status", "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(
        (
            status["messages"].as_u64(),
            status["inbound"]["mails"].as_u64()
        ),
        (Some(2), Some(1)),
        "{status}"
    );

    // Act
    let drained = cli(&nats.url(), &spool_dir, &["spool", "drain"]);

    // Assert
    let out = text(&drained.stdout);
    assert!(
        drained.status.success(),
        "drain failed: {out}{}",
        text(&drained.stderr)
    );
    assert!(
        out.contains("published 2 messages and 1 inbound mails"),
        "{out}"
    );
    let js = jetstream_of(&nats.url()).await;
    assert_eq!(stored_count(&js).await, 3);
    let stream = js.get_stream(STREAM).await.unwrap();
    let last = stream
        .get_last_raw_message_by_subject("cmc.inbound.>")
        .await;
    let last = last.map(|m| m.sequence).unwrap_or_default();
    assert_eq!(last, 3, "the mail after the events");
    let status: Value = serde_json::from_slice(
        &cli(&nats.url(), &spool_dir, &["spool", "status", "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(
        (
            status["messages"].as_u64(),
            status["inbound"]["mails"].as_u64()
        ),
        (Some(0), Some(0)),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_drain_sends_a_stopped_services_inbound_mail_objects_then_one_message() {
    // Arrange: a mail with two attachments spooled by the real service while NATS is down.
    let mut nats = NatsServer::start().await;
    let Spooled {
        mut service,
        http,
        spool_dir,
        dir: _dir,
    } = Spooled::start(&nats, &[]).await;
    nats.stop();
    let body = std::fs::read(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/inbound/multipart.txt"),
    )
    .unwrap();
    let response = http
        .post(format!(
            "http://127.0.0.1:{}/webhooks/cmc/inbound",
            service.port
        ))
        .header(
            "content-type",
            "multipart/form-data; boundary=----CMCInboundBoundary7MA4YWxkTrZu0gW",
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["spooled"], 1, "{answer}");

    // While the service runs on the directory, drain refuses and the mail stays.
    let refused = cli(&nats.url(), &spool_dir, &["spool", "drain"]);
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains("in use by another process"));
    let status: Value = serde_json::from_slice(
        &cli(&nats.url(), &spool_dir, &["spool", "status", "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(status["inbound"]["mails"], 1, "{status}");
    assert!(
        status["inbound"]["bytes"].as_u64().unwrap() > 1000,
        "{status}"
    );
    assert!(status["inbound"]["oldest_age_seconds"].as_f64().is_some());
    let shown = text(&cli(&nats.url(), &spool_dir, &["spool", "status"]).stdout);
    assert!(shown.contains("inbound waiting: 1 mails"), "{shown}");

    // Act
    service.terminate().await;
    nats.restart().await;
    let drained = cli(&nats.url(), &spool_dir, &["spool", "drain"]);

    // Assert: both objects, then exactly one message; the status shows zero.
    let out = text(&drained.stdout);
    assert!(
        drained.status.success(),
        "drain failed: {out}{}",
        text(&drained.stderr)
    );
    assert!(out.contains("and 1 inbound mails"), "{out}");
    let status: Value = serde_json::from_slice(
        &cli(&nats.url(), &spool_dir, &["spool", "status", "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(status["inbound"]["mails"], 0, "{status}");
    assert_eq!(status["inbound"]["bytes"], 0, "{status}");
    assert_eq!(status["messages"], 0, "{status}");
    let js = jetstream_of(&nats.url()).await;
    let stored = stored_count(&js).await;
    assert_eq!(stored, 1, "exactly one message");
    let objects = js
        .get_stream("OBJ_CMC_INBOUND")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state;
    let again = cli(&nats.url(), &spool_dir, &["spool", "drain"]);
    assert!(text(&again.stdout).contains("is empty"));
    assert_eq!(stored_count(&js).await, 1, "and still one");
    let message = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    let sent: Value = serde_json::from_slice(&message.payload).unwrap();
    let listed = sent["attachments"].as_array().unwrap().len();
    println!(
        "[inbound_drain] attachments listed={listed} object-stream messages={} stored messages={}",
        objects.messages, stored
    );
    assert_eq!(listed, 2, "{sent}");
    // Each object is one chunk and one metadata message at least.
    assert!(objects.messages >= 4, "{objects:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_requeue_puts_a_quarantined_message_back_and_it_is_published_once() {
    // Arrange: a message quarantined because NATS came back with a smaller max_payload.
    let mut nats = NatsServer::start().await;
    let Spooled {
        mut service,
        http,
        spool_dir,
        dir: _dir,
    } = Spooled::start(&nats, &[("SPOOL__RETRY_MAX_INTERVAL", "500ms")]).await;
    nats.stop();
    let (status, answer, _) = post(&http, &service.webhook_url(), body("small", 3, 300)).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer, poison) =
        post(&http, &service.webhook_url(), body("poison", 1, 900_000)).await;
    assert_eq!(status, 200, "{answer}");
    let poison = poison.unwrap();
    let (args, default_args) = (nats.args.clone(), nats.args.clone());
    let conf = nats.dir().join("small.conf");
    std::fs::write(&conf, "max_payload: 524288\n").unwrap();
    nats.args = [args, vec!["-c".into(), conf.display().to_string()]].concat();
    nats.restart().await;
    let js = jetstream_of(&nats.url()).await;
    assert_eq!(wait_stored(&js, 3, Duration::from_secs(30)).await, 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    let name = loop {
        let out = cli(&nats.url(), &spool_dir, &["spool", "status", "--json"]);
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(entry) = status["quarantined"].as_array().and_then(|q| q.first()) {
            break entry["name"].as_str().unwrap_or_default().to_owned();
        }
        assert!(Instant::now() < deadline, "nothing quarantined: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    service.terminate().await;
    nats.args = default_args;
    nats.restart().await;

    // Act: put it back, then drain.
    let unknown = cli(
        &nats.url(),
        &spool_dir,
        &["spool", "requeue", "no-such-entry"],
    );
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("no-such-entry"),
        "{}",
        text(&unknown.stderr)
    );
    let requeued = cli(&nats.url(), &spool_dir, &["spool", "requeue", &name]);
    assert!(
        requeued.status.success(),
        "{}{}",
        text(&requeued.stdout),
        text(&requeued.stderr)
    );
    assert!(
        text(&requeued.stdout).contains("requeued 1"),
        "{}",
        text(&requeued.stdout)
    );
    let status: Value = serde_json::from_slice(
        &cli(&nats.url(), &spool_dir, &["spool", "status", "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(status["messages"], 1, "{status}");
    assert_eq!(
        status["quarantined"].as_array().unwrap().len(),
        0,
        "{status}"
    );
    let drained = cli(&nats.url(), &spool_dir, &["spool", "drain"]);
    assert!(drained.status.success(), "{}", text(&drained.stderr));
    // Nothing left to requeue.
    let again = cli(&nats.url(), &spool_dir, &["spool", "requeue", "--all"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stdout).contains("requeued 0"),
        "{}",
        text(&again.stdout)
    );

    // Assert: published once, after the others.
    let stored = stored_messages(&js).await;
    let batches: Vec<&str> = stored.iter().map(|(batch, _, _)| batch.as_str()).collect();
    assert_eq!(batches.len(), 4, "{batches:?}");
    assert_eq!(batches.iter().filter(|b| **b == poison).count(), 1);
    assert_eq!(batches[3], poison);
    println!("[requeue] quarantined={name} requeued and stored once");
}

/// The stream deleted while the service runs (an operator's mistake, a restore gone wrong):
/// with `nats.stream.create = true` it is created again and the spool drains into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_deleted_while_the_service_runs_is_created_again_and_the_spool_drains() {
    // Arrange
    let nats = NatsServer::start().await;
    let Spooled {
        mut service,
        http,
        spool_dir: _,
        dir: _dir,
    } = Spooled::start(&nats, &[]).await;
    let js = jetstream_of(&nats.url()).await;
    let (status, answer, _) = post(&http, &service.webhook_url(), body("before", 5, 100)).await;
    assert_eq!(
        (status, answer["published"].as_u64()),
        (200, Some(5)),
        "{answer}"
    );

    // Act
    js.delete_stream(STREAM).await.unwrap();
    let (status, answer, _) = post(&http, &service.webhook_url(), body("after", 5, 100)).await;
    assert_eq!(status, 200, "{answer}");

    // Assert: the stream is back, with the batch answered 200 while it was gone.
    let count = wait_stored(&js, 5, Duration::from_secs(15)).await;
    assert_eq!(
        count,
        5,
        "the stream was not created again:\n{}",
        service.log_tail()
    );
    // Stored is not yet drained: the drainer records its progress just after.
    let metrics = format!("http://127.0.0.1:{}/metrics", service.admin_port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !get_text(&http, &metrics)
        .await
        .lines()
        .any(|l| l == "cmc_forwarder_spool_messages 0")
    {
        assert!(Instant::now() < deadline, "the spool did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, answer, _) = post(&http, &service.webhook_url(), body("later", 3, 100)).await;
    assert_eq!(
        (status, answer["published"].as_u64()),
        (200, Some(3)),
        "{answer}"
    );
    service.terminate().await;
}

/// With `nats.stream.create = false` the service must not create it: `/readyz` says which
/// stream is missing, and the spool drains once an operator has created it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_deleted_while_the_service_runs_with_create_false_is_named_by_readyz() {
    // Arrange: the stream made by an operator.
    let nats = NatsServer::start().await;
    let js = jetstream_of(&nats.url()).await;
    let config = jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["cmc.>".into()],
        ..Default::default()
    };
    js.create_stream(config.clone()).await.unwrap();
    let Spooled {
        mut service,
        http,
        spool_dir: _,
        dir: _dir,
    } = Spooled::start(&nats, &[("NATS__STREAM__CREATE", "false")]).await;

    // Act
    js.delete_stream(STREAM).await.unwrap();
    let (status, answer, _) = post(&http, &service.webhook_url(), body("gone", 4, 100)).await;
    assert_eq!(status, 200, "{answer}");

    // Assert: not ready, naming the stream; nothing created behind the operator's back.
    let deadline = Instant::now() + Duration::from_secs(10);
    let readyz = loop {
        let response = http.get(service.readyz()).send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        if status == 503 || Instant::now() > deadline {
            break (status, text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(readyz.0, 503, "{}", readyz.1);
    assert!(readyz.1.contains(STREAM), "{}", readyz.1);
    assert!(
        js.get_stream(STREAM).await.is_err(),
        "created although create = false"
    );
    js.create_stream(config).await.unwrap();
    assert_eq!(wait_stored(&js, 4, Duration::from_secs(15)).await, 4);
    wait_for_status(&http, &service.readyz(), 200, Duration::from_secs(10)).await;
    service.terminate().await;
}

/// A stream at its limits with `discard: new` refuses with an API error that waiting can fix:
/// the batch's rest is spooled (`200`), never answered as refused, never quarantined, and the
/// spool drains once the operator raises the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_at_its_limits_with_discard_new_is_waited_for_not_refused() {
    // Arrange: the operator's stream holds at most 2 messages.
    let nats = NatsServer::start().await;
    let js = jetstream_of(&nats.url()).await;
    let mut config = jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["cmc.>".into()],
        max_messages: 2,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    js.create_stream(config.clone()).await.unwrap();
    let Spooled {
        mut service,
        http,
        spool_dir,
        dir: _dir,
    } = Spooled::start(
        &nats,
        &[
            ("NATS__STREAM__CREATE", "false"),
            ("SPOOL__RETRY_MAX_INTERVAL", "300ms"),
        ],
    )
    .await;

    // Act
    let (status, answer, _) = post(&http, &service.webhook_url(), body("full", 4, 100)).await;

    // Assert
    assert_eq!(status, 200, "{answer}\n{}", service.log_tail());
    assert_eq!(answer["spooled"], 2, "{answer}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = cli(&nats.url(), &spool_dir, &["spool", "status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        status["quarantined"].as_array().unwrap().len(),
        0,
        "{status}"
    );
    assert_eq!(status["messages"], 2, "{status}");
    config.max_messages = -1;
    js.update_stream(config).await.unwrap();
    assert_eq!(wait_stored(&js, 4, Duration::from_secs(10)).await, 4);
    service.terminate().await;
}

/// A message over the stream's own `max_msg_size` can never be stored: refused at once
/// (`503`, nothing spooled), unlike a stream at its limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_streams_max_msg_size_is_refused_not_spooled() {
    // Arrange
    let nats = NatsServer::start().await;
    let js = jetstream_of(&nats.url()).await;
    js.create_stream(jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["cmc.>".into()],
        max_message_size: 2000,
        ..Default::default()
    })
    .await
    .unwrap();
    let Spooled {
        mut service,
        http,
        spool_dir,
        dir: _dir,
    } = Spooled::start(&nats, &[("NATS__STREAM__CREATE", "false")]).await;

    // Act
    let (status, answer, _) = post(&http, &service.webhook_url(), body("big", 1, 5000)).await;

    // Assert
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap_or_default()
            .contains("10054"),
        "{answer}"
    );
    let out = cli(&nats.url(), &spool_dir, &["spool", "status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["messages"], 0, "{status}");
    service.terminate().await;
}
