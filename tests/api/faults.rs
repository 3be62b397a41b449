//! Fault tests (issue 4): NATS killed and restarted, a cluster node killed, the service stopped
//! with SIGTERM or killed with SIGKILL, NATS absent at start-up, all under a modest load.
//!
//! Every test sends batches of distinct events (so JetStream's dedup hides nothing), prints
//! `sent=… answered_200=… stored=… duplicates=… lost=…` (in events) and asserts that every
//! event of every request answered `200` is in the stream exactly once: the stream holds as
//! many messages as distinct `Nats-Msg-Id`s, and no event body twice. No request may hang
//! (every one is bounded by a client timeout), and every `200` body must account for its
//! entries: `published + spooled` = entries (SPEC §2).
//!
//! Run them one at a time (they kill processes and share two cores):
//! `cargo test --test api faults:: -- --nocapture --test-threads=1` (`scripts/test` does).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use cmc_forwarder::startup::Application;
use serde_json::{json, Value};

use crate::helpers::*;

/// Events per batch; every one distinct.
const PER_BATCH: usize = 10;
/// A sender's batches at most (the load stays a few hundred requests).
const MAX_BATCHES: usize = 80;
/// Pause between two batches of one sender.
const PAUSE: Duration = Duration::from_millis(40);
/// Pause before a retry.
const RETRY_PAUSE: Duration = Duration::from_millis(150);
/// A retrying sender gives one batch up after this long (counted, and fails the test).
const RETRY_BOUND: Duration = Duration::from_secs(30);
/// Time given to the stream (and the drainer) to hold every event answered `200`.
const SETTLE: Duration = Duration::from_secs(30);
const STREAM: &str = "CMC_EVENTS";
const STATUSES: [&str; 4] = ["queued", "succeeded", "failed", "deferred"];

// ---------------------------------------------------------------------------------------
// Load: batches of distinct events, senders that retry or not, and their tally.

/// Settings of a service in front of `servers` with its spool on in `dir`.
fn spooling(servers: Vec<String>, dir: &Path) -> cmc_forwarder::settings::Settings {
    let mut settings = settings_for(servers);
    settings.spool.enabled = true;
    settings.spool.dir = dir.to_owned();
    settings
}

/// The service built from `settings`, running in this process (it must start, NATS or not).
async fn in_process(settings: &cmc_forwarder::settings::Settings) -> InProc {
    let app = Application::build(settings)
        .await
        .expect("the service starts");
    InProc::run(app, &settings.server.path)
}

/// A JSON webhook of `PER_BATCH` distinct deliveries, and the events' keys (`messageId`).
fn batch(tag: &str, sender: usize, n: usize) -> (Vec<u8>, Vec<String>) {
    let mut keys = Vec::with_capacity(PER_BATCH);
    let entries: Vec<Value> = (0..PER_BATCH)
        .map(|i| {
            let key = format!("<{tag}-{sender}-{n}-{i}@faults.example.com>");
            keys.push(key.clone());
            let status = STATUSES[(n + i) % STATUSES.len()];
            let mut entry = json!({
                "created": "2024-05-01 12:00:00",
                "returnPath": "bounce@return.example.com",
                "from": "info@example.com",
                "to": format!("user-{sender}-{n}-{i}@example.jp"),
                "messageId": key,
                "subject": "fault test",
                "apiData": "",
                "status": status,
            });
            if status == "failed" || status == "deferred" {
                entry["reason"] = json!("450 4.2.1 try again later");
            }
            entry
        })
        .collect();
    let body = json!({
        "server_composition": "pro",
        "event_type": "deliveries",
        "event": {"deliveries": entries},
    });
    (serde_json::to_vec(&body).unwrap(), keys)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// One attempt per batch, whatever the answer.
    Never,
    /// Every non-`200` answer is retried (after `RETRY_PAUSE`) until `200`, within `RETRY_BOUND`.
    UntilOk,
}

/// Shared between the controller and the senders.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    /// `200` answers so far (the controller waits for some after a fault).
    oks: AtomicUsize,
    /// Set just before the service is told to stop: failures are expected from then on.
    terminating: AtomicBool,
}

impl Load {
    /// Waits until `more` further `200` answers arrived (proof the service recovered).
    async fn wait_for_oks(&self, more: usize, within: Duration) -> bool {
        let target = self.oks.load(Ordering::Acquire) + more;
        let deadline = Instant::now() + within;
        while self.oks.load(Ordering::Acquire) < target {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}

/// What the senders saw.
#[derive(Debug, Default)]
struct Tally {
    batches: usize,
    requests: usize,
    /// Events of every batch sent at least once.
    sent: usize,
    /// Keys of the events of batches answered `200`.
    answered: Vec<String>,
    ok: usize,
    unavailable: usize,
    other_status: HashMap<u16, usize>,
    connection_errors: usize,
    timeouts: usize,
    /// `200` answers whose body said `"spooled" > 0`.
    spooled_answers: usize,
    spooled_events: usize,
    /// `200` answers where `published + spooled` is not the number of entries (SPEC §2).
    inconsistent_answers: usize,
    /// Non-`200` outcomes that arrived before the service was told to stop.
    failures_before_stop: usize,
    /// Batches a retrying sender gave up on.
    gave_up: usize,
    /// Slowest request.
    slowest: Duration,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.batches += other.batches;
        self.requests += other.requests;
        self.sent += other.sent;
        self.answered.extend(other.answered);
        self.ok += other.ok;
        self.unavailable += other.unavailable;
        for (status, n) in other.other_status {
            *self.other_status.entry(status).or_default() += n;
        }
        self.connection_errors += other.connection_errors;
        self.timeouts += other.timeouts;
        self.spooled_answers += other.spooled_answers;
        self.spooled_events += other.spooled_events;
        self.inconsistent_answers += other.inconsistent_answers;
        self.failures_before_stop += other.failures_before_stop;
        self.gave_up += other.gave_up;
        self.slowest = self.slowest.max(other.slowest);
    }

    /// The `n`th batch of a test's single sequential sender, counted as sent.
    fn next_batch(&mut self, tag: &str, n: usize) -> (Vec<u8>, Vec<String>) {
        let (body, keys) = batch(tag, 0, n);
        self.batches += 1;
        self.sent += keys.len();
        (body, keys)
    }

    /// Posts one batch once and records the outcome; true when answered `200`.
    async fn post(
        &mut self,
        http: &reqwest::Client,
        url: &str,
        body: &[u8],
        keys: &[String],
        load: &Load,
    ) -> bool {
        self.requests += 1;
        let started = Instant::now();
        let result = http
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await;
        let ok = match result {
            Ok(response) if response.status() == 200 => match response.json::<Value>().await {
                Ok(answer) => {
                    self.ok += 1;
                    let published = answer["published"].as_u64().unwrap_or(0) as usize;
                    let spooled = answer["spooled"].as_u64().unwrap_or(0) as usize;
                    if spooled > 0 {
                        self.spooled_answers += 1;
                        self.spooled_events += spooled;
                    }
                    if published + spooled != keys.len() {
                        self.inconsistent_answers += 1;
                    }
                    self.answered.extend(keys.iter().cloned());
                    load.oks.fetch_add(1, Ordering::AcqRel);
                    true
                }
                // The answer was 200 but its body was cut: count it as a connection error
                // (the sender cannot know it succeeded).
                Err(e) if e.is_timeout() => {
                    self.timeouts += 1;
                    false
                }
                Err(_) => {
                    self.connection_errors += 1;
                    false
                }
            },
            Ok(response) => {
                if response.status() == 503 {
                    self.unavailable += 1;
                } else {
                    *self
                        .other_status
                        .entry(response.status().as_u16())
                        .or_default() += 1;
                }
                false
            }
            Err(e) if e.is_timeout() => {
                self.timeouts += 1;
                false
            }
            Err(_) => {
                self.connection_errors += 1;
                false
            }
        };
        if !ok && !load.terminating.load(Ordering::Acquire) {
            self.failures_before_stop += 1;
        }
        self.slowest = self.slowest.max(started.elapsed());
        ok
    }
}

async fn sender(url: String, tag: String, id: usize, retry: Retry, load: Arc<Load>) -> Tally {
    let http = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .unwrap();
    let mut tally = Tally::default();
    for n in 0..MAX_BATCHES {
        if load.stop.load(Ordering::Acquire) {
            break;
        }
        let (body, keys) = batch(&tag, id, n);
        tally.batches += 1;
        tally.sent += keys.len();
        let give_up = Instant::now() + RETRY_BOUND;
        while !tally.post(&http, &url, &body, &keys, &load).await {
            if retry == Retry::Never {
                break;
            }
            if Instant::now() >= give_up {
                tally.gave_up += 1;
                break;
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        tokio::time::sleep(PAUSE).await;
    }
    tally
}

/// Running senders.
struct Senders {
    load: Arc<Load>,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
}

impl Senders {
    fn start(url: &str, tag: &str, count: usize, retry: Retry) -> Senders {
        let load = Arc::new(Load::default());
        let tasks = (0..count)
            .map(|id| {
                tokio::spawn(sender(
                    url.to_owned(),
                    tag.to_owned(),
                    id,
                    retry,
                    load.clone(),
                ))
            })
            .collect();
        Senders { load, tasks }
    }

    /// Stops them after their current batch and adds up what they saw.
    async fn finish(self) -> Tally {
        self.load.stop.store(true, Ordering::Release);
        let mut total = Tally::default();
        let all = futures_util::future::join_all(self.tasks);
        let results = tokio::time::timeout(RETRY_BOUND + CLIENT_TIMEOUT, all)
            .await
            .expect("senders finished (a request or retry loop hung)");
        for tally in results {
            total.merge(tally.expect("sender task"));
        }
        total
    }
}

// ---------------------------------------------------------------------------------------
// The stream: what is stored, waiting for it, and the verdict.

/// A JetStream client for reading the stream, reconnecting quickly to any of `urls`.
async fn reader(urls: &[String]) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(urls)
        .await
        .unwrap();
    jetstream::new(client)
}

impl Stored {
    /// Messages beyond the first of their `Nats-Msg-Id`, or of their event.
    fn duplicates(&self) -> usize {
        let by_id = self.messages - self.ids.len();
        let by_event: usize = self.keys.values().map(|n| n - 1).sum();
        by_id.max(by_event)
    }

    fn missing<'a>(&self, answered: &'a [String]) -> Vec<&'a String> {
        answered
            .iter()
            .filter(|k| !self.keys.contains_key(*k))
            .collect()
    }
}

async fn message_count(js: &jetstream::Context) -> Option<u64> {
    let info = tokio::time::timeout(Duration::from_secs(3), async {
        js.get_stream(STREAM).await.ok()?.get_info().await.ok()
    })
    .await
    .ok()??;
    Some(info.state.messages)
}

/// Waits (up to `SETTLE`) until every answered event is stored and, when given, the spool
/// directory is drained; then reads the stream once more.
async fn settle(js: &jetstream::Context, answered: &[String], spool_dir: Option<&Path>) -> Stored {
    let deadline = Instant::now() + SETTLE;
    loop {
        let count = message_count(js).await.unwrap_or(0) as usize;
        let spool_empty = spool_dir.is_none_or(|d| spool_segments(d) == 0);
        if count >= answered.len() && spool_empty {
            if let Some(stored) = read_stream(js, STREAM).await {
                if stored.missing(answered).is_empty() {
                    return stored;
                }
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Out of time: what is there now is the verdict.
    for _ in 0..10 {
        if let Some(stored) = read_stream(js, STREAM).await {
            return stored;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the stream cannot be read");
}

/// Spool segment files (the drainer deletes a segment once it is wholly published).
fn spool_segments(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension() == Some("seg".as_ref()))
                .count()
        })
        .unwrap_or(0)
}

/// Prints the figures and asserts exactly once for every event answered `200`.
fn verdict(test: &str, tally: &Tally, stored: &Stored, extra: &str) {
    let missing = stored.missing(&tally.answered);
    let duplicates = stored.duplicates();
    println!(
        "[{test}] sent={} answered_200={} stored={} duplicates={} lost={}",
        tally.sent,
        tally.answered.len(),
        stored.messages,
        duplicates,
        missing.len()
    );
    println!(
        "[{test}]   requests={} batches={} 200={} 503={} other={:?} connection_errors={} timeouts={} \
         gave_up={} spooled_answers={} spooled_events={} slowest={:?}{extra}",
        tally.requests,
        tally.batches,
        tally.ok,
        tally.unavailable,
        tally.other_status,
        tally.connection_errors,
        tally.timeouts,
        tally.gave_up,
        tally.spooled_answers,
        tally.spooled_events,
        tally.slowest,
    );
    assert!(
        missing.is_empty(),
        "{test}: {} events answered 200 are not in the stream, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(duplicates, 0, "{test}: duplicates stored");
    assert_eq!(
        stored.messages,
        stored.ids.len(),
        "{test}: messages vs distinct Nats-Msg-Id"
    );
    assert_eq!(
        tally.timeouts, 0,
        "{test}: requests hung until the client timeout"
    );
    assert_eq!(
        tally.gave_up, 0,
        "{test}: retried batches never answered 200"
    );
    assert!(
        tally.other_status.is_empty(),
        "{test}: unexpected answers {:?}",
        tally.other_status
    );
    // Every event sent is stored at most once, answered or not.
    assert!(
        stored.keys.len() <= tally.sent,
        "{test}: unknown events stored"
    );
    assert_answers_consistent(test, tally);
}

/// SPEC §2: a `200` body says `published + spooled` = the number of entries.
fn assert_answers_consistent(test: &str, tally: &Tally) {
    assert_eq!(
        tally.inconsistent_answers, 0,
        "{test}: {} of {} answers 200 did not have published + spooled = entries \
         (the body of a 200 must report \"spooled\")",
        tally.inconsistent_answers, tally.ok
    );
}

/// Messages left in a spool directory no process uses any more.
fn spool_backlog(dir: &Path) -> u64 {
    cmc_forwarder::spool::status(dir).unwrap().messages
}

// ---------------------------------------------------------------------------------------
// 1. NATS killed and restarted under load, spool on, senders never retry.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_under_load_with_spool_loses_nothing() {
    let test = "nats_restart_spool";
    let started = Instant::now();
    let mut nats = NatsServer::start().await;
    let spool = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&nats);
    settings.spool.enabled = true;
    settings.spool.dir = spool.path().to_owned();
    settings.nats.publish_timeout = Duration::from_secs(1);
    let app = spawn_app_with(settings).await;
    let js = reader(&[nats.url()]).await;

    let senders = Senders::start(&app.webhook_url(), test, 6, Retry::Never);
    assert!(senders.load.wait_for_oks(30, WAIT).await, "no load");
    nats.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nats.restart().await;
    let tally = recover_and_settle(
        test,
        senders,
        &js,
        Some(spool.path()),
        "NATS came back",
        started,
    )
    .await;
    // Without retries, only the spool can keep the answers 200 while NATS is down.
    assert_eq!(
        tally.ok, tally.requests,
        "{test}: with the spool on, every request should be answered 200"
    );
}

// ---------------------------------------------------------------------------------------
// 2. The same with the spool off: 503 while NATS is down, the senders retry until 200.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_under_load_without_spool_loses_nothing_with_retries() {
    let test = "nats_restart_no_spool";
    let started = Instant::now();
    let mut nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.spool.enabled = false;
    settings.nats.publish_timeout = Duration::from_secs(1);
    let app = spawn_app_with(settings).await;
    let js = reader(&[nats.url()]).await;

    let senders = Senders::start(&app.webhook_url(), test, 6, Retry::UntilOk);
    assert!(senders.load.wait_for_oks(30, WAIT).await, "no load");
    nats.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nats.restart().await;
    let tally = recover_and_settle(test, senders, &js, None, "NATS came back", started).await;
    assert!(
        tally.unavailable > 0,
        "{test}: NATS was down but nothing was refused"
    );
    assert_eq!(
        tally.spooled_answers, 0,
        "{test}: spooled with the spool off"
    );
    assert_eq!(
        tally.answered.len(),
        tally.sent,
        "{test}: every batch ends 200"
    );
}

// ---------------------------------------------------------------------------------------
// 3. A 3-node cluster, stream R3: the stream leader killed under load.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_killed_in_a_cluster_loses_nothing_with_retries() {
    let test = "cluster_leader_killed";
    let started = Instant::now();
    let mut cluster = NatsCluster::start().await;
    let mut settings = settings_for(cluster.urls());
    settings.nats.stream.replicas = 3;
    settings.nats.publish_timeout = Duration::from_secs(2);
    settings.nats.connect_timeout = Duration::from_secs(5);
    // Cluster formation and the meta-leader election take a few seconds: stream creation
    // fails until then.
    let deadline = Instant::now() + Duration::from_secs(30);
    let app = loop {
        match Application::build(&settings).await {
            Ok(app) => break app,
            Err(e) => {
                assert!(Instant::now() < deadline, "the service never built: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let formed = started.elapsed();
    let app = InProc::run(app, &settings.server.path);
    let js = reader(&cluster.urls()).await;

    // The stream leader, once every replica is current.
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        let info = async { js.get_stream(STREAM).await.ok()?.get_info().await.ok() }.await;
        if let Some(cluster_info) = info.and_then(|i| i.cluster) {
            if let Some(leader) = &cluster_info.leader {
                if cluster_info.replicas.len() == 2
                    && cluster_info.replicas.iter().all(|p| p.current)
                {
                    break leader.clone();
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the stream has no leader with current replicas"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let senders = Senders::start(&app.address, test, 6, Retry::UntilOk);
    assert!(senders.load.wait_for_oks(30, WAIT).await, "no load");
    let killed_at = Instant::now();
    cluster.kill(&leader);
    let recovered = senders.load.wait_for_oks(60, Duration::from_secs(30)).await;
    let recovery = killed_at.elapsed();
    let tally = senders.finish().await;
    assert!(recovered, "no 200 after the leader was killed");

    let stored = settle(&js, &tally.answered, None).await;
    let new_leader = async {
        js.get_stream(STREAM)
            .await
            .ok()?
            .get_info()
            .await
            .ok()?
            .cluster?
            .leader
    }
    .await;
    verdict(
        test,
        &tally,
        &stored,
        &format!(
            " killed={leader} new_leader={new_leader:?} formed_in={formed:?} recovered_in≈{recovery:?} wall={:?}",
            started.elapsed()
        ),
    );
    assert_eq!(
        tally.answered.len(),
        tally.sent,
        "{test}: every batch ends 200"
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// 4. SIGTERM to the real binary under load.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_and_loses_nothing() {
    let test = "sigterm";
    let started = Instant::now();
    let nats = NatsServer::start().await;
    let mut bin = Binary::start(&nats.url()).await;
    let js = reader(&[nats.url()]).await;

    let senders = Senders::start(&bin.service.webhook_url(), test, 6, Retry::Never);
    assert!(senders.load.wait_for_oks(60, WAIT).await, "no load");
    let (exit_after, tally) = stop_under_load(&mut bin.service, senders).await;

    // What the first run spooled at shutdown (if anything) is published by the next run.
    assert!(tally.ok > 0);
    let run = SigtermRun::after_exit(test, tally, exit_after, bin.spool.path(), started);
    run.next_run_drains(&nats.url(), &js, &bin, false).await;
}

// ---------------------------------------------------------------------------------------
// 4b. SIGTERM while NATS is down: batches are spooled, the service must still exit 0 in
// time (nothing to flush to), and the next run publishes the spool.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nats_down_exits_0_and_the_next_run_drains_the_spool() {
    let test = "sigterm_nats_down";
    let started = Instant::now();
    let mut nats = NatsServer::start().await;
    let mut bin = Binary::start(&nats.url()).await;
    let js = reader(&[nats.url()]).await;

    let senders = Senders::start(&bin.service.webhook_url(), test, 4, Retry::Never);
    assert!(senders.load.wait_for_oks(20, WAIT).await, "no load");
    nats.stop();
    // Some batches are spooled while NATS is down, then the service is told to stop.
    assert!(
        senders.load.wait_for_oks(20, WAIT).await,
        "no 200 with NATS down"
    );
    let (exit_after, tally) = stop_under_load(&mut bin.service, senders).await;

    nats.restart().await;
    let run = SigtermRun::after_exit(test, tally, exit_after, bin.spool.path(), started);
    run.next_run_drains(&nats.url(), &js, &bin, true).await;
}

// ---------------------------------------------------------------------------------------
// 4c. SIGTERM while NATS is frozen (SIGSTOP) under load: in-flight batches wait for acks
// that never come, get at most `publish_timeout`, are spooled and answered 200; the final
// flush cannot complete. The service must still exit 0 in time, and the next run (NATS
// resumed) publishes the spool exactly once, even where the frozen server stored a message
// before its batch was spooled.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nats_frozen_exits_0_and_loses_nothing() {
    let test = "sigterm_nats_frozen";
    let started = Instant::now();
    let mut nats = NatsServer::configured("frozen", 0, Vec::new());
    nats.launch().await;
    let pid = nats.pid().to_string();
    let signal = |signal: &str| {
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    };
    let mut bin = Binary::start(&nats.url()).await;

    let senders = Senders::start(&bin.service.webhook_url(), test, 6, Retry::Never);
    assert!(senders.load.wait_for_oks(30, WAIT).await, "no load");
    signal("-STOP");
    // Let requests pile up waiting for acks, then stop the service under them.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (exit_after, tally) = stop_under_load(&mut bin.service, senders).await;

    signal("-CONT");
    let js = reader(&[nats.url()]).await;
    let run = SigtermRun::after_exit(test, tally, exit_after, bin.spool.path(), started);
    run.next_run_drains(&nats.url(), &js, &bin, true).await;
}

/// The real binary against a NATS server, its spool and log in temporary directories, ready.
struct Binary {
    spool: tempfile::TempDir,
    _logs: tempfile::TempDir,
    log: PathBuf,
    http: reqwest::Client,
    service: Service,
}

impl Binary {
    async fn start(nats_url: &str) -> Binary {
        let spool = tempfile::tempdir().unwrap();
        let logs = tempfile::tempdir().unwrap();
        let log = logs.path().join("service.log");
        let http = http_client();
        let mut service = Service::start(nats_url, spool.path(), &log);
        service.wait_ready(&http).await;
        Binary {
            spool,
            _logs: logs,
            log,
            http,
            service,
        }
    }
}

/// After a disruption: the load must get a 200 again, then every event answered 200 must be
/// stored exactly once (`verdict`). Returns the tally for the test's own checks.
async fn recover_and_settle(
    test: &str,
    senders: Senders,
    js: &jetstream::Context,
    spool: Option<&Path>,
    disruption_ended: &str,
    started: Instant,
) -> Tally {
    let recovered = senders.load.wait_for_oks(60, WAIT).await;
    let tally = senders.finish().await;
    assert!(recovered, "no 200 after {disruption_ended}");
    let stored = settle(js, &tally.answered, spool).await;
    verdict(
        test,
        &tally,
        &stored,
        &format!(" wall={:?}", started.elapsed()),
    );
    tally
}

/// SIGTERM to the service while the senders are busy (their failures from then on are not
/// counted against it); returns how long it took to exit, and what the senders saw.
async fn stop_under_load(service: &mut Service, senders: Senders) -> (Duration, Tally) {
    senders.load.terminating.store(true, Ordering::Release);
    let exit_after = service.terminate().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    (exit_after, senders.finish().await)
}

/// What a SIGTERM-with-a-spool test saw up to the service's exit.
struct SigtermRun<'a> {
    test: &'a str,
    tally: Tally,
    exit_after: Duration,
    /// What the spool held at exit (`Spool::len`).
    backlog: u64,
    started: Instant,
}

impl<'a> SigtermRun<'a> {
    /// Once the first run has exited: reads what it left in `spool`.
    fn after_exit(
        test: &'a str,
        tally: Tally,
        exit_after: Duration,
        spool: &Path,
        started: Instant,
    ) -> Self {
        let backlog = spool_backlog(spool);
        SigtermRun {
            test,
            tally,
            exit_after,
            backlog,
            started,
        }
    }

    /// The second half of those tests: with NATS back, a new run of the service on the same
    /// spool as the `first` publishes what the first one left (`must_have_spooled`: the first run cannot
    /// have ended with an empty spool). Every answered event must then be stored exactly
    /// once, nothing failed before the signal, and the spool ends empty.
    async fn next_run_drains(
        self,
        nats_url: &str,
        js: &jetstream::Context,
        first: &Binary,
        must_have_spooled: bool,
    ) {
        let spool = first.spool.path();
        let SigtermRun {
            test,
            tally,
            exit_after,
            backlog,
            started,
        } = self;
        if must_have_spooled {
            assert!(backlog > 0, "{test}: nothing was spooled");
        }
        if backlog > 0 {
            let mut again = Service::start(nats_url, spool, &first.log);
            again.wait_ready(&first.http).await;
            settle(js, &tally.answered, Some(spool)).await;
            again.terminate().await;
        }
        // Read after the second run has exited: a duplicate published at its shutdown counts.
        let stored = settle(js, &tally.answered, None).await;
        verdict(
            test,
            &tally,
            &stored,
            &format!(
                " exit_after_sigterm={exit_after:?} spooled_at_shutdown={backlog} wall={:?}",
                started.elapsed()
            ),
        );
        assert_eq!(
            tally.failures_before_stop, 0,
            "{test}: requests failed before SIGTERM"
        );
        assert_eq!(spool_backlog(spool), 0, "{test}: spool not drained");
    }
}
// ---------------------------------------------------------------------------------------
// 5. SIGKILL with a non-empty spool, then NATS and the service restarted.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_a_full_spool_then_restart_publishes_it_exactly_once() {
    let test = "sigkill_spool";
    let started = Instant::now();
    let mut nats = NatsServer::start().await;
    let mut bin = Binary::start(&nats.url()).await;
    let js = reader(&[nats.url()]).await;

    let load = Load::default();
    let mut tally = Tally::default();
    let url = bin.service.webhook_url();
    // Before the fault: published directly.
    for n in 0..3 {
        let (body, keys) = tally.next_batch(test, n);
        assert!(tally.post(&bin.http, &url, &body, &keys, &load).await);
    }
    nats.stop();
    wait_for_status(&bin.http, &bin.service.readyz(), 503, WAIT).await;
    // NATS down: every batch answered 200 from the spool.
    for n in 3..33 {
        let (body, keys) = tally.next_batch(test, n);
        assert!(
            tally.post(&bin.http, &url, &body, &keys, &load).await,
            "{test}: not 200 with NATS down"
        );
    }
    let on_disk: u64 = std::fs::read_dir(bin.spool.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension() == Some("seg".as_ref()))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(on_disk > 0, "{test}: nothing in the spool");
    bin.service.signal("-KILL");
    let status = bin
        .service
        .wait_exit(WAIT)
        .await
        .expect("SIGKILL ends the process");
    assert!(!status.success());

    nats.restart().await;
    bin.service = Service::start(&nats.url(), bin.spool.path(), &bin.log);
    bin.service.wait_ready(&bin.http).await;
    // New batches go behind the spooled ones.
    let url = bin.service.webhook_url();
    for n in 33..36 {
        let (body, keys) = tally.next_batch(test, n);
        assert!(tally.post(&bin.http, &url, &body, &keys, &load).await);
    }
    let stored = settle(&js, &tally.answered, Some(bin.spool.path())).await;
    let exit_after = bin.service.terminate().await;
    verdict(
        test,
        &tally,
        &stored,
        &format!(
            " spool_bytes_at_kill={on_disk} exit_after_sigterm={exit_after:?} wall={:?}",
            started.elapsed()
        ),
    );
    assert_eq!(tally.answered.len(), tally.sent);
    assert_eq!(
        spool_backlog(bin.spool.path()),
        0,
        "{test}: spool not drained"
    );
}

// ---------------------------------------------------------------------------------------
// 6. NATS unreachable at start-up: not ready, batches spooled; NATS appears: ready, drained.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_unreachable_at_start_up_then_started_spooled_events_land() {
    let test = "nats_late";
    let started = Instant::now();
    let port = free_port();
    let spool = tempfile::tempdir().unwrap();
    let mut settings = spooling(vec![format!("nats://127.0.0.1:{port}")], spool.path());
    settings.nats.connect_timeout = Duration::from_millis(300);
    let app = in_process(&settings).await;
    let http = http_client();
    let readyz = format!("{}/readyz", app.admin);
    assert_eq!(status_of(&http, &readyz).await, 503);

    let load = Load::default();
    let mut tally = Tally::default();
    for n in 0..5 {
        let (body, keys) = tally.next_batch(test, n);
        assert!(
            tally.post(&http, &app.address, &body, &keys, &load).await,
            "{test}: not 200 (spooled) without NATS"
        );
    }
    assert!(spool_segments(spool.path()) > 0, "{test}: nothing spooled");

    let mut nats = NatsServer::configured("late", port, Vec::new());
    nats.launch().await;
    let appeared = Instant::now();
    wait_for_status(&http, &readyz, 200, Duration::from_secs(15)).await;
    let ready_after = appeared.elapsed();
    for n in 5..8 {
        let (body, keys) = tally.next_batch(test, n);
        assert!(tally.post(&http, &app.address, &body, &keys, &load).await);
    }
    let js = reader(&[nats.url()]).await;
    let stored = settle(&js, &tally.answered, Some(spool.path())).await;
    verdict(
        test,
        &tally,
        &stored,
        &format!(
            " ready_after_nats_started={ready_after:?} wall={:?}",
            started.elapsed()
        ),
    );
    assert_eq!(tally.answered.len(), tally.sent);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// 6b. The connection black-holed (left open, nothing carried either way, no reset): the
// client finds it dead after two unanswered pings, within about three `nats.ping_interval`s,
// and reconnects; what was spooled meanwhile lands. With the client's own default interval
// (60 s) it took about three minutes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_connection_is_found_dead_by_pings_and_the_spool_drains() {
    let test = "blackhole";
    let nats = NatsServer::start().await;
    let proxy = crate::proxy::Proxy::start(vec![nats.port]).await;
    let spool = tempfile::tempdir().unwrap();
    let mut settings = spooling(vec![proxy.url()], spool.path());
    settings.nats.ping_interval = Duration::from_secs(1);
    settings.nats.publish_timeout = Duration::from_secs(1);
    let app = in_process(&settings).await;
    let http = http_client();
    let load = Load::default();
    let mut tally = Tally::default();
    let (body, keys) = tally.next_batch(test, 0);
    assert!(tally.post(&http, &app.address, &body, &keys, &load).await);

    // The open connection is swallowed for good; new ones go through.
    proxy.set_blackholed(true);
    proxy.set_blackholed(false);
    let cut = Instant::now();
    for n in 1..4 {
        let (body, keys) = tally.next_batch(test, n);
        assert!(
            tally.post(&http, &app.address, &body, &keys, &load).await,
            "{test}: batch {n} not 200 (spooled)"
        );
    }
    let js = reader(&[nats.url()]).await;
    let deadline = cut + Duration::from_secs(20);
    while (message_count(&js).await.unwrap_or(0) as usize) < tally.answered.len() {
        assert!(
            Instant::now() < deadline,
            "{test}: the spool did not drain within 20 s: the dead connection was not replaced"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_after = cut.elapsed();
    let stored = settle(&js, &tally.answered, Some(spool.path())).await;
    verdict(
        test,
        &tally,
        &stored,
        &format!(" drained_after={drained_after:?}"),
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// 7. NATS frozen (SIGSTOP) under load, spool on: the connection stays up but nothing is
// acknowledged, so batches time out and are spooled while some of their messages may be
// stored anyway; after SIGCONT the drainer republishes them (same ids: stored once).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_frozen_under_load_with_spool_loses_and_duplicates_nothing() {
    let test = "nats_frozen_spool";
    let started = Instant::now();
    let mut nats = NatsServer::configured("frozen", 0, Vec::new());
    nats.launch().await;
    let spool = tempfile::tempdir().unwrap();
    let app = in_process(&spooling(vec![nats.url()], spool.path())).await;
    let js = reader(&[nats.url()]).await;
    let pid = nats.pid().to_string();
    let signal = |signal: &str| {
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    };

    let senders = Senders::start(&app.address, test, 6, Retry::Never);
    assert!(senders.load.wait_for_oks(30, WAIT).await, "no load");
    signal("-STOP");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    signal("-CONT");
    let tally = recover_and_settle(
        test,
        senders,
        &js,
        Some(spool.path()),
        "NATS resumed",
        started,
    )
    .await;
    assert_eq!(
        tally.ok, tally.requests,
        "{test}: with the spool on, every request should be answered 200"
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// 8. A cluster without a JetStream quorum at start-up (one node of three up, as after the
// cluster lost power): the stream's set-up gets no answer. The binary must serve anyway (the
// spool takes the batches) and set the stream up once the quorum is back, not exit with
// "cannot start" (which the fault campaign found: forwarders restarted during a cluster's
// recovery exited 1, again and again).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_without_a_jetstream_quorum_serves_and_sets_the_stream_up_later() {
    let test = "no_quorum_at_start";
    let started = Instant::now();
    let mut nodes = cluster_nodes("quorum", "q", &[]);
    nodes[0].launch().await;
    let spool = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("service.log");
    let http = http_client();
    let mut service = Launch::service(&log)
        .nats(&nodes[0].url())
        .spool(spool.path())
        .settings(&[("NATS__STREAM__REPLICAS", "3")])
        .start();
    // The stream's set-up times out; the service says it goes on, and must still run.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(status) = service.child.try_wait().unwrap() {
            panic!(
                "{test}: the service exited ({status}) without a JetStream quorum:\n{}",
                service.log_tail()
            );
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("JetStream not answering yet") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{test}: no word on the stream's set-up:\n{}",
            service.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + WAIT;
    while status_of(&http, &service.readyz()).await != 503 {
        assert!(
            Instant::now() < deadline,
            "{test}: not serving:\n{}",
            service.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let load = Load::default();
    let mut tally = Tally::default();
    let url = service.webhook_url();
    for n in 0..5 {
        let (body, keys) = tally.next_batch(test, n);
        assert!(
            tally.post(&http, &url, &body, &keys, &load).await,
            "{test}: not 200 (spooled) without a quorum"
        );
    }
    assert_eq!(tally.spooled_events, tally.sent, "{test}: not spooled");

    // The quorum comes back: the stream is set up, the spool drains.
    for node in &mut nodes[1..] {
        node.launch().await;
    }
    wait_for_status(&http, &service.readyz(), 200, Duration::from_secs(60)).await;
    let urls: Vec<String> = nodes.iter().map(NatsServer::url).collect();
    let js = reader(&urls).await;
    let stored = settle(&js, &tally.answered, Some(spool.path())).await;
    let exit_after = service.terminate().await;
    verdict(
        test,
        &tally,
        &stored,
        &format!(
            " exit_after_sigterm={exit_after:?} wall={:?}",
            started.elapsed()
        ),
    );
    assert_eq!(tally.answered.len(), tally.sent);
}

/// A cluster that has just started has no meta leader for a moment: its JetStream requests
/// time out, or are answered "JetStream system temporarily unavailable" (10008; the campaign
/// met it, this machine answers with the time-out). A service started at the same moment (a
/// whole site powered up again) must wait that out in the background, not exit with "cannot
/// start".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_while_the_cluster_elects_its_leader_serves_and_sets_the_stream_up() {
    let test = "electing_at_start";
    let mut nodes = cluster_nodes("electing", "e", &[]);
    for node in &mut nodes {
        node.launch().await;
    }
    let spool = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("service.log");
    let http = http_client();
    let urls: Vec<String> = nodes.iter().map(NatsServer::url).collect();
    let mut service = Launch::service(&log)
        .nats(&urls.join(","))
        .spool(spool.path())
        .settings(&[("NATS__STREAM__REPLICAS", "3")])
        .start();
    // Not exiting while the cluster elects its leader, and ready once it has.
    service
        .wait_ready_within(&http, Duration::from_secs(60))
        .await;
    let waited = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("JetStream not answering yet");
    println!("[{test}] ready; the set-up was waited out in the background: {waited}");
    service.terminate().await;
}

/// A new cluster with one node of three not up yet (or not joined yet) cannot place an R3
/// stream: "no suitable peers for placement" (10005). That passes once the node is there, so
/// the service must serve meanwhile (`/readyz` says why) and set the stream up then, not exit
/// with "cannot start" (the power-loss tests met it: a whole cluster restarted at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_before_a_cluster_can_place_the_stream_waits_for_it() {
    let test = "no_placement_at_start";
    let mut nodes = cluster_nodes("placing", "p", &[]);
    for node in &mut nodes[..2] {
        node.launch().await;
    }
    let spool = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("service.log");
    let http = http_client();
    let urls: Vec<String> = nodes.iter().map(NatsServer::url).collect();
    let mut service = Launch::service(&log)
        .nats(&urls[..2].join(","))
        .spool(spool.path())
        .settings(&[("NATS__STREAM__REPLICAS", "3")])
        .start();
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        if let Some(status) = service.child.try_wait().unwrap() {
            panic!(
                "{test}: the service exited ({status}) while the stream could not be placed:\n{}",
                service.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nodes[2].launch().await;
    wait_for_status(&http, &service.readyz(), 200, Duration::from_secs(60)).await;
    println!("[{test}] served while the stream could not be placed, ready once it could");
    service.terminate().await;
}

// ---------------------------------------------------------------------------------------
// 9. SIGTERM while start-up still waits for NATS (a server that accepts the connection and
// never speaks): exit 0, as once serving, not death by the signal (which the fault campaign
// found when it stopped a forwarder just restarted).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_start_up_exits_0() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let _held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            kept.push(stream);
        }
    });
    let spool = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("service.log");
    let mut service = Launch::service(&log)
        .nats(&format!("nats://127.0.0.1:{port}"))
        .spool(spool.path())
        .settings(&[("NATS__CONNECT_TIMEOUT", "20s")])
        .start();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let http = http_client();
    assert_eq!(
        status_of(&http, &service.readyz()).await,
        0,
        "still starting: not serving yet"
    );
    assert!(service.child.try_wait().unwrap().is_none());
    service.signal("-TERM");
    let status = service
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exits soon after SIGTERM");
    assert!(
        status.success(),
        "exit status {status} after SIGTERM during start-up:\n{}",
        service.log_tail()
    );
}
