//! Power loss (SPEC §2 "Power loss"). nats-server acknowledges a JetStream publish before it
//! syncs its store, so a power cut leaves the store as it was at its last sync.
//! [`NatsServer::last_sync`] and [`NatsServer::lose_power`] emulate that (a copy taken while the
//! server is paused, put back after a SIGKILL); the first two tests show they lose exactly what
//! came after the copy, so a test built on them cannot pass for the wrong reason.
//!
//! The cases after them take that copy, have the real binary answer `200` to batches of
//! distinct events (or to mails with attachments), cut the power, and check that every event
//! answered `200` is in the stream once after recovery: the single node, the shared host (the
//! service killed too, started again after NATS or before it), a 3-node cluster with an R3
//! stream rolled back at once, copies taken before the stream existed, the service killed
//! while it publishes its log again, a second cut during that replay, a cut in the middle of a
//! spool drain, an outage longer than `spool.retain`, a cut under load, events and mails
//! drained from the spool before the cut, Inbound mails with their objects. Restarts without a
//! power cut: of the service alone and a quick one of NATS alone store nothing twice; one of
//! NATS under load loses nothing. Each prints `case=… answered=… stored=… duplicates=…`. The
//! last test shows what the README says of the spool off: a `200` then does not survive the
//! power cut. The submodule [`fs`] cuts the power at the file-system level instead (every
//! store on lazyfs, SIGKILL, then what was never synced dropped); the scenarios of issue 28
//! (a sender's retry, an R3 stream whose other nodes lose power, a freeze of NATS while
//! batches are spooled) are in [`cases`].
//!
//! They kill processes: `scripts/test` runs them one at a time, with
//! `cargo test --test api power:: -- --nocapture --test-threads=1`.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::object_store::ObjectStore;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use crate::helpers::*;
use crate::inbound::{mail_with, sha};

async fn stream_count(js: &jetstream::Context, name: &str) -> Option<u64> {
    let mut stream = js.get_stream(name).await.ok()?;
    Some(stream.info().await.ok()?.state.messages)
}

async fn create_stream(js: &jetstream::Context) {
    js.create_stream(jetstream::stream::Config {
        name: "POWER".into(),
        subjects: vec!["power.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn publish_acked(js: &jetstream::Context, from: usize, to: usize) {
    for i in from..to {
        js.publish(format!("power.{i}"), "x".into())
            .await
            .unwrap()
            .await
            .expect("acknowledged");
    }
}

#[tokio::test]
async fn a_power_cut_loses_every_acknowledged_message_after_the_last_sync() {
    // Arrange: 10 acknowledged messages, the "last sync", 10 more acknowledged.
    let mut nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    create_stream(&js).await;
    publish_acked(&js, 0, 10).await;
    let sync = nats.last_sync();
    publish_acked(&js, 10, 20).await;
    assert_eq!(stream_count(&js, "POWER").await, Some(20));

    // Act
    nats.lose_power(&sync).await;

    // Assert: the 10 acknowledged after the sync are gone.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    assert_eq!(stream_count(&js, "POWER").await, Some(10));
}

#[tokio::test]
async fn a_power_cut_before_the_first_sync_of_a_stream_loses_the_stream() {
    let mut nats = NatsServer::start().await;
    let sync = nats.last_sync();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    create_stream(&js).await;
    publish_acked(&js, 0, 5).await;

    nats.lose_power(&sync).await;

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    assert_eq!(stream_count(&js, "POWER").await, None, "the stream is gone");
}

// ---------------------------------------------------------------------------------------
// The real binary in front of nats-servers that lose power.

pub(super) const STREAM: &str = "CMC_EVENTS";
/// Events per batch, every one distinct (so JetStream's dedup hides nothing).
pub(super) const PER_BATCH: usize = 100;
/// Batches answered `200` between the last sync and the power cut.
pub(super) const BATCHES: usize = 20;
/// Requests in flight at once.
const IN_FLIGHT: usize = 4;
/// Time given, after recovery, for every event answered `200` to be in the stream.
const SETTLE: Duration = Duration::from_secs(15);

/// A JSON webhook of `PER_BATCH` distinct deliveries, and the events' keys (`messageId`).
pub(super) fn batch(case: &str, n: usize) -> (Vec<u8>, Vec<String>) {
    let keys: Vec<String> = (0..PER_BATCH)
        .map(|i| format!("<{case}-{n}-{i}@power.example.com>"))
        .collect();
    let entries: Vec<Value> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            json!({
                "created": "2024-05-01 12:00:00",
                "returnPath": "bounce@return.example.com",
                "from": "info@example.com",
                "to": format!("user-{n}-{i}@example.jp"),
                "messageId": key,
                "subject": "power test",
                "apiData": "",
                "status": "succeeded",
            })
        })
        .collect();
    let body = json!({
        "server_composition": "pro",
        "event_type": "deliveries",
        "event": {"deliveries": entries},
    });
    (serde_json::to_vec(&body).unwrap(), keys)
}

/// How the batches must be answered.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// `200`, every event published and none spooled: the spool fsyncs before it answers, so a
    /// spooled event would survive the cut for another reason than the one under test.
    Published,
    /// `200`, every event spooled (NATS is down).
    Spooled,
}

/// Posts batches `batches` of `case`, `IN_FLIGHT` at a time, each answered as `expected`
/// says, and returns the keys of their events.
pub(super) async fn answer_batches(url: &str, case: &str, batches: Range<usize>) -> Vec<String> {
    post_batches(url, case, batches, Answer::Published).await
}

pub(super) async fn post_batches(
    url: &str,
    case: &str,
    batches: Range<usize>,
    expected: Answer,
) -> Vec<String> {
    let http = http_client();
    let answered = futures_util::stream::iter(batches)
        .map(|n| {
            let http = &http;
            async move {
                let (answer, keys) = post_batch(http, url, case, n).await;
                let (published, spooled) = match expected {
                    Answer::Published => (PER_BATCH, 0),
                    Answer::Spooled => (0, PER_BATCH),
                };
                assert_eq!(
                    (
                        answer["published"].as_u64().unwrap_or(0) as usize,
                        answer["spooled"].as_u64().unwrap_or(0) as usize
                    ),
                    (published, spooled),
                    "{case}: batch {n} (published, spooled): {answer}"
                );
                keys
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    answered.into_iter().flatten().collect()
}

/// Posts batch `n` of `case` ([`batch`]) and returns its answer, which must be `200`, and the
/// keys of its events.
pub(super) async fn post_batch(
    http: &reqwest::Client,
    url: &str,
    case: &str,
    n: usize,
) -> (Value, Vec<String>) {
    let (body, keys) = batch(case, n);
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{case}: batch {n} not answered: {e}"));
    let status = response.status();
    let answer: Value = response.json().await.expect("a JSON body");
    assert_eq!(status, 200, "{case}: batch {n}: {answer}");
    (answer, keys)
}

/// A JetStream client for reading, reconnecting quickly to any of `urls`.
pub(super) async fn reader(urls: &[String]) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(urls)
        .await
        .unwrap();
    jetstream::new(client)
}

/// Messages in the stream now; `None` when it cannot be read (gone, or no leader yet).
pub(super) async fn message_count(js: &jetstream::Context) -> Option<u64> {
    let info = tokio::time::timeout(Duration::from_secs(2), async {
        js.get_stream(STREAM).await.ok()?.get_info().await.ok()
    })
    .await
    .ok()??;
    Some(info.state.messages)
}

/// The keys of `answered` the stream does not hold.
pub(super) fn missing<'a>(stored: &Stored, answered: &'a [String]) -> Vec<&'a String> {
    answered
        .iter()
        .filter(|k| !stored.keys.contains_key(*k))
        .collect()
}

/// Messages beyond the first of their `Nats-Msg-Id`, or of their event.
pub(super) fn duplicates(stored: &Stored) -> usize {
    let by_id = stored.messages - stored.ids.len();
    let by_event: usize = stored.keys.values().map(|n| n - 1).sum();
    by_id.max(by_event)
}

/// Waits (up to `SETTLE`) until every event of `answered` is in the stream, and reads it again
/// a second later (a late copy would show as a duplicate). At the deadline, what is there is
/// the verdict: nothing when the stream is gone.
pub(super) async fn settle(urls: &[String], answered: &[String]) -> Stored {
    let js = reader(urls).await;
    let deadline = Instant::now() + SETTLE;
    loop {
        let count = message_count(&js).await.unwrap_or(0) as usize;
        if count >= answered.len() {
            if let Some(stored) = read_stream(&js, STREAM).await {
                if missing(&stored, answered).is_empty() {
                    break;
                }
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..5 {
        if let Some(stored) = read_stream(&js, STREAM).await {
            return stored;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Stored::default()
}

/// Prints `case=… answered=… stored=… duplicates=…` and asserts that every event answered
/// `200` is in the stream, once.
pub(super) fn verdict(
    case: &str,
    answered: &[String],
    stored: &Stored,
    extra: &str,
    log_tail: &str,
) {
    let missing = missing(stored, answered);
    let duplicates = duplicates(stored);
    println!(
        "case={case} answered={} stored={} duplicates={} messages={}{extra}",
        answered.len(),
        answered.len() - missing.len(),
        duplicates,
        stored.messages,
    );
    assert!(
        missing.is_empty(),
        "{case}: {} of {} events answered 200 are not in the stream after the power cut, \
         e.g. {:?}; the service's log ends:\n{log_tail}",
        missing.len(),
        answered.len(),
        &missing[..missing.len().min(3)]
    );
    assert_eq!(duplicates, 0, "{case}: duplicates stored:\n{log_tail}");
    assert_eq!(
        stored.keys.len(),
        answered.len(),
        "{case}: events stored that were never answered 200"
    );
}

/// One nats-server and the service in front of it, with its spool and log in a directory of
/// their own: the stage of every single-node case.
pub(super) struct Stage {
    pub(super) case: &'static str,
    pub(super) started: Instant,
    pub(super) nats: NatsServer,
    settings: &'static [(&'static str, &'static str)],
    dir: tempfile::TempDir,
    pub(super) http: reqwest::Client,
    pub(super) service: Service,
}

impl Stage {
    /// NATS up, and the service started with `settings` in front of it, ready.
    pub(super) async fn start(
        case: &'static str,
        settings: &'static [(&'static str, &'static str)],
    ) -> Stage {
        Stage::serve(case, NatsServer::start().await, settings).await
    }

    /// The service started with `settings` in front of `nats`, ready.
    async fn serve(
        case: &'static str,
        nats: NatsServer,
        settings: &'static [(&'static str, &'static str)],
    ) -> Stage {
        let dir = tempfile::tempdir().unwrap();
        let (spool, log) = (dir.path().join("spool"), dir.path().join("service.log"));
        let http = http_client();
        let mut service = Service::start_with(&nats.url(), &spool, &log, settings);
        service.wait_ready(&http).await;
        Stage {
            case,
            started: Instant::now(),
            nats,
            settings,
            dir,
            http,
            service,
        }
    }

    /// Another process of the service, on the same spool, log and settings (the previous one
    /// must have exited).
    fn launch(&self) -> Service {
        let (spool, log) = (
            self.dir.path().join("spool"),
            self.dir.path().join("service.log"),
        );
        Service::start_with(&self.nats.url(), &spool, &log, self.settings)
    }

    /// SIGKILLs the service and waits for it to exit.
    async fn kill_service(&mut self) {
        self.service.signal("-KILL");
        self.service.wait_exit(WAIT).await.expect("SIGKILLed");
    }

    pub(super) fn url(&self) -> String {
        self.service.webhook_url()
    }

    async fn reader(&self) -> jetstream::Context {
        reader(&[self.nats.url()]).await
    }

    /// Waits for every event of `answered` to be in the stream ([`settle`]) and reads it.
    pub(super) async fn settle(&self, answered: &[String]) -> Stored {
        settle(&[self.nats.url()], answered).await
    }

    /// Prints the figures (`extra` and the wall time among them) and asserts [`verdict`].
    fn judge(&self, answered: &[String], stored: &Stored, extra: &str) {
        let extra = format!("{extra} wall={:?}", self.started.elapsed());
        verdict(
            self.case,
            answered,
            stored,
            &extra,
            &self.service.log_tail(),
        );
    }

    /// [`Stage::settle`], then [`Stage::judge`].
    pub(super) async fn verdict(&self, answered: &[String], extra: &str) {
        let stored = self.settle(answered).await;
        self.judge(answered, &stored, extra);
    }
}

/// Waits (up to `SETTLE`) until the stream holds at least half of `total` messages and, with
/// `inside_a_step`, a count that is not a whole number of drain steps (a cut or a kill then
/// lands in the middle of a step, some of whose messages NATS has acknowledged and some not);
/// returns the count.
async fn past_half(js: &jetstream::Context, total: usize, inside_a_step: bool) -> u64 {
    let half = total as u64 / 2;
    let deadline = Instant::now() + SETTLE;
    loop {
        let count = message_count(js).await.unwrap_or(0);
        let placed = !inside_a_step || count % DRAIN_STEP != 0;
        if (count >= half && placed) || Instant::now() >= deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Asserts that `at` (messages stored at a cut or a kill) lies past half of `total` and short of
/// all of it.
fn assert_in_the_middle(case: &str, what: &str, at: u64, total: usize) {
    assert!(
        at >= total as u64 / 2 && (at as usize) < total,
        "{case}: {what} did not land in the middle ({at} of {total} stored)"
    );
}

/// When the stream was created (`None` when it cannot be read): a stream the power cut took
/// away and the service created again has another time.
async fn stream_created(urls: &[String]) -> Option<String> {
    let js = reader(urls).await;
    let stream = tokio::time::timeout(Duration::from_secs(5), js.get_stream(STREAM))
        .await
        .ok()?
        .ok()?;
    Some(stream.cached_info().created.to_string())
}

/// Asserts the stream is the one from before the cut, or one created again when the cut took
/// it away (the copy was taken before it existed); `" recreated=…"` for the figures.
fn check_created(
    case: &str,
    sync_at: SyncAt,
    before: &Option<String>,
    after: &Option<String>,
) -> String {
    assert!(
        before.is_some() && after.is_some(),
        "{case}: the stream cannot be read"
    );
    let recreated = before != after;
    assert_eq!(
        recreated,
        sync_at == SyncAt::BeforeStream,
        "{case}: the stream is created again exactly when the cut took it away"
    );
    format!(" recreated={recreated}")
}

/// When the "last sync" is taken.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SyncAt {
    /// After the service created its stream: the stream survives, its messages do not.
    AfterStream,
    /// Before the stream existed: the stream is gone after the cut.
    BeforeStream,
}

/// Where the service runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Host {
    /// On another host: it keeps running through NATS's power cut.
    Apart,
    /// On NATS's host: SIGKILLed at the same moment, started again (same spool) once NATS is
    /// back.
    Shared,
    /// As `Shared`, but the service is started again before NATS is back (its host came up
    /// first).
    SharedServiceFirst,
}

/// A single nats-server and the service: the last sync, `BATCHES` batches answered `200`,
/// the power cut, recovery, the verdict.
async fn single_node(case: &'static str, sync_at: SyncAt, host: Host) {
    let nats = NatsServer::start().await;
    let early = (sync_at == SyncAt::BeforeStream).then(|| nats.last_sync());
    let mut stage = Stage::serve(case, nats, &[]).await;
    let sync = early.unwrap_or_else(|| stage.nats.last_sync());
    let answered = answer_batches(&stage.url(), case, 0..BATCHES).await;
    let created = stream_created(&[stage.nats.url()]).await;

    match host {
        Host::Apart => stage.nats.lose_power(&sync).await,
        Host::Shared | Host::SharedServiceFirst => {
            stage.service.signal("-KILL");
            stage.nats.power_off(&sync);
            stage.service.wait_exit(WAIT).await.expect("SIGKILLed");
            if host == Host::SharedServiceFirst {
                stage.service = stage.launch();
                // Serving (the listener opens without NATS) before NATS is back.
                wait_for_status(&stage.http, &stage.service.readyz(), 503, WAIT).await;
                stage.nats.launch().await;
            } else {
                stage.nats.launch().await;
                stage.service = stage.launch();
            }
        }
    }

    let stored = stage.settle(&answered).await;
    let after = stream_created(&[stage.nats.url()]).await;
    let recreated = check_created(case, sync_at, &created, &after);
    stage.judge(&answered, &stored, &recreated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_answered_200_survives_a_power_cut_of_the_nats_host() {
    single_node("single_node", SyncAt::AfterStream, Host::Apart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_answered_200_survives_a_power_cut_of_a_host_running_both() {
    single_node("shared_host", SyncAt::AfterStream, Host::Shared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_answered_200_survives_a_shared_host_whose_service_starts_first() {
    single_node(
        "shared_host_service_first",
        SyncAt::AfterStream,
        Host::SharedServiceFirst,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_lost_with_the_power_is_created_again_with_every_event_answered_200() {
    single_node("before_stream", SyncAt::BeforeStream, Host::Apart).await;
}

/// Waits until both followers of the R3 stream are current, so the copies of the three nodes
/// all hold it.
pub(super) async fn wait_replicated(js: &jetstream::Context) {
    let deadline = Instant::now() + WAIT;
    loop {
        let info = match js.get_stream(STREAM).await {
            Ok(stream) => stream.get_info().await.ok(),
            Err(_) => None,
        };
        let current = info
            .and_then(|info| info.cluster)
            .map(|c| c.replicas.len() == 2 && c.replicas.iter().all(|p| p.current))
            .unwrap_or(false);
        if current {
            return;
        }
        assert!(Instant::now() < deadline, "the R3 stream never replicated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A 3-node cluster and the service with an R3 stream: the last sync of every node, `BATCHES`
/// batches answered `200`, every node's power cut at once, recovery, the verdict.
async fn cluster_case(case: &str, sync_at: SyncAt) {
    let started = Instant::now();
    let mut cluster = NatsCluster::start().await;
    let urls = cluster.urls();
    let dir = tempfile::tempdir().unwrap();
    let (spool, log) = (dir.path().join("spool"), dir.path().join("service.log"));
    let http = http_client();
    let early: Option<Vec<LastSync>> = (sync_at == SyncAt::BeforeStream)
        .then(|| cluster.nodes.iter().map(NatsServer::last_sync).collect());
    let mut service = Service::start_with(
        &urls.join(","),
        &spool,
        &log,
        &[("NATS__STREAM__REPLICAS", "3")],
    );
    service.wait_ready(&http).await;
    wait_replicated(&reader(&urls).await).await;
    let syncs = early.unwrap_or_else(|| cluster.nodes.iter().map(NatsServer::last_sync).collect());
    let answered = answer_batches(&service.webhook_url(), case, 0..BATCHES).await;
    let created = stream_created(&urls).await;

    // Every node down before any comes back: no node can hand the others what they lost.
    for (node, sync) in cluster.nodes.iter_mut().zip(&syncs) {
        node.power_off(sync);
    }
    for node in &mut cluster.nodes {
        node.launch().await;
    }

    let stored = settle(&urls, &answered).await;
    let replicas = reader(&urls)
        .await
        .get_stream(STREAM)
        .await
        .map(|s| s.cached_info().config.num_replicas)
        .unwrap_or(0);
    let recreated = check_created(case, sync_at, &created, &stream_created(&urls).await);
    let extra = format!(
        "{recreated} replicas={replicas} wall={:?}",
        started.elapsed()
    );
    verdict(case, &answered, &stored, &extra, &service.log_tail());
    assert_eq!(replicas, 3, "{case}: the stream is R3 after recovery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_answered_200_survives_a_power_cut_of_a_whole_r3_cluster() {
    cluster_case("cluster_r3", SyncAt::AfterStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_stream_lost_with_the_power_of_its_cluster_is_created_again_with_every_event() {
    cluster_case("cluster_r3_before_stream", SyncAt::BeforeStream).await;
}

/// The service killed while it publishes its log again after NATS lost power: a window of
/// many batches, so that the kill lands in the middle (half of it published again, the rest
/// not); started again, it must still store every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_killed_while_it_publishes_its_log_again_loses_nothing() {
    let mut stage = Stage::start("replay_crash", &[]).await;
    let sync = stage.nats.last_sync();
    let answered = answer_batches(&stage.url(), stage.case, 0..5 * BATCHES).await;

    stage.nats.lose_power(&sync).await;
    // The stream survived empty: what comes into it is the log published again. The kill
    // comes once half of it is back.
    let js = stage.reader().await;
    past_half(&js, answered.len(), false).await;
    stage.kill_service().await;
    let at_kill = message_count(&js).await.unwrap_or(0);
    stage.service = stage.launch();

    let extra = format!(" stored_when_killed={at_kill}");
    stage.verdict(&answered, &extra).await;
    assert_in_the_middle(stage.case, "the kill", at_kill, answered.len());
}

/// Batches spooled while NATS was down, published by the drainer once it is back, then lost
/// with NATS's power: what the drainer published is kept as what was published directly is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_drained_from_the_spool_survive_a_power_cut_after_the_drain() {
    let mut stage = Stage::start("drained", &[]).await;
    let sync = stage.nats.last_sync();
    stage.nats.stop();
    let answered = post_batches(&stage.url(), stage.case, 0..BATCHES, Answer::Spooled).await;
    stage.nats.launch().await;
    let drained = stage.settle(&answered).await;
    assert!(
        missing(&drained, &answered).is_empty(),
        "{}: the spool was not drained:\n{}",
        stage.case,
        stage.service.log_tail()
    );

    stage.nats.lose_power(&sync).await;

    stage.verdict(&answered, "").await;
}

/// NATS loses power while the drainer publishes the spool (batches spooled during an outage),
/// in the middle of a drain step: what NATS acknowledged of the spool before the cut is
/// published again, with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_in_the_middle_of_a_drain_loses_nothing() {
    let mut stage = Stage::start("drain_cut", &[]).await;
    let sync = stage.nats.last_sync();
    stage.nats.stop();
    let batches = 0..5 * BATCHES;
    let answered = post_batches(&stage.url(), stage.case, batches, Answer::Spooled).await;
    stage.nats.launch().await;
    let at_cut = past_half(&stage.reader().await, answered.len(), true).await;

    stage.nats.lose_power(&sync).await;

    stage
        .verdict(&answered, &format!(" stored_at_cut={at_cut}"))
        .await;
    assert_in_the_middle(stage.case, "the cut", at_cut, answered.len());
}

/// The defaults (`duplicate_window` and `spool.retain` both 2 minutes) scaled down to seconds.
const SCALED: [(&str, &str); 2] = [
    ("NATS__STREAM__DUPLICATE_WINDOW", "6s"),
    ("SPOOL__RETAIN", "6s"),
];
/// Longer than what `SCALED`'s retention keeps a record: the retention, the publish timeout
/// (1 s: a record is written at most that long before its PubAck), the retained log's margin
/// of a second, and a second until the next check of the stream expires it.
const PAST_RETAIN: Duration = Duration::from_millis(10_500);

/// A restart of the service in front of the same NATS process (a deploy) publishes nothing
/// again, so stores nothing twice: half the events are answered longer ago than the
/// (scaled) `duplicate_window` when it restarts, where a replay would store them twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_the_service_alone_stores_nothing_twice() {
    let mut stage = Stage::start("restart_service", &SCALED).await;
    let answered = answer_across_the_window(&stage).await;

    stage.service.terminate().await;
    stage.service = stage.launch();
    stage.service.wait_ready(&stage.http).await;
    // Time for a replay, were there one.
    tokio::time::sleep(Duration::from_secs(3)).await;

    stage.verdict(&answered, "").await;
}

/// Half the batches, then a pause longer than `SCALED`'s retention, then the other half: the
/// events of the first half are older than the duplicate window when something happens next.
async fn answer_across_the_window(stage: &Stage) -> Vec<String> {
    let (url, case) = (stage.url(), stage.case);
    let mut answered = answer_batches(&url, case, 0..BATCHES / 2).await;
    tokio::time::sleep(PAST_RETAIN).await;
    answered.extend(answer_batches(&url, case, BATCHES / 2..BATCHES).await);
    answered
}

/// A quick restart of nats-server alone, its store intact (an upgrade): the service cannot
/// tell it from a power cut and publishes again what that server acknowledged in the
/// `spool.retain` (+ 1 s) before it was last seen, all of it still inside `duplicate_window`,
/// so nothing is stored twice; what is older is not published again. Half the events are
/// answered longer ago than that when NATS stops, half just before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_restart_of_nats_alone_stores_nothing_twice() {
    let mut stage = Stage::start("restart_nats", &SCALED).await;
    let answered = answer_across_the_window(&stage).await;

    stage.nats.restart().await;
    stage.service.wait_ready(&stage.http).await;
    // Time for the replay, which NATS de-duplicates whole.
    tokio::time::sleep(Duration::from_secs(3)).await;

    stage.verdict(&answered, "").await;
}

/// A restart of nats-server alone, its store intact (an upgrade), under steady load: the
/// service cannot tell it from a power cut, and publishes again what that server acknowledged
/// in the last `spool.retain`. Nothing may be lost. What JetStream no longer recognises as a
/// duplicate (stored longer ago than `duplicate_window`) is stored twice, a price the README
/// states; the figures print it (`duplicates=`, against the events of `nats_down` plus two
/// seconds: `outage_plus_2s=`), they are not held to a bound here, since the scaled window
/// of 6 s is not a faithful miniature of 2 minutes for delays that do not scale (the client's
/// reconnection, the replay's own publishing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_nats_alone_under_load_loses_nothing() {
    let mut stage = Stage::start("restart_nats_load", &SCALED).await;
    let case = stage.case;
    let load = Instant::now();
    let senders = Senders::start(&stage, 1);

    // Longer than the window, so its oldest records are older than the duplicate window.
    tokio::time::sleep(PAST_RETAIN).await;
    let down = Instant::now();
    stage.nats.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stage.nats.launch().await;
    let down = down.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answered = senders.stop().await.answered;
    let load = load.elapsed();

    let stored = stage.settle(&answered).await;
    let missing = missing(&stored, &answered);
    let duplicates = duplicates(&stored);
    // Events answered per second over the whole load (a lower bound of the rate before the
    // restart, which the outage slowed down).
    let rate = answered.len() as f64 / load.as_secs_f64();
    let outage = (rate * (down.as_secs_f64() + 2.0)) as usize;
    println!(
        "case={case} answered={} stored={} duplicates={} messages={} nats_down={down:?} \
         events_per_s={rate:.0} outage_plus_2s={outage} wall={:?}",
        answered.len(),
        answered.len() - missing.len(),
        duplicates,
        stored.messages,
        stage.started.elapsed()
    );
    let tail = stage.service.log_tail();
    assert!(
        missing.is_empty(),
        "{case}: {} events answered 200 are not in the stream:\n{tail}",
        missing.len()
    );
}

/// Messages the spool's drainer publishes in one step (README, "Duplicates").
const DRAIN_STEP: u64 = 512;

/// NATS loses power a second time while the service publishes its log again (the same last
/// sync: it synced nothing in between), in the middle of a drain step: the second replay must
/// still bring back everything, the part of that step NATS had acknowledged included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_power_cut_during_the_replay_loses_nothing() {
    let mut stage = Stage::start("double_cut", &[]).await;
    let sync = stage.nats.last_sync();
    let answered = answer_batches(&stage.url(), stage.case, 0..5 * BATCHES).await;

    stage.nats.lose_power(&sync).await;
    // Half of it back, and the cut in the middle of a drain step (README: 512 messages).
    let at_second_cut = past_half(&stage.reader().await, answered.len(), true).await;
    stage.nats.lose_power(&sync).await;

    let extra = format!(" stored_at_second_cut={at_second_cut}");
    stage.verdict(&answered, &extra).await;
    assert_in_the_middle(stage.case, "the second cut", at_second_cut, answered.len());
}

/// NATS stays down (after its power cut) longer than `spool.retain`: what it acknowledged
/// before is kept until it is published again, however long the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_retention_loses_nothing() {
    let mut stage = Stage::start("long_outage", &[("SPOOL__RETAIN", "2s")]).await;
    let sync = stage.nats.last_sync();
    let answered = answer_batches(&stage.url(), stage.case, 0..BATCHES).await;

    stage.nats.power_off(&sync);
    tokio::time::sleep(Duration::from_secs(4)).await;
    stage.nats.launch().await;

    stage.verdict(&answered, "").await;
}

/// Requests keep coming while NATS loses power and comes back: the last sync and the cut both
/// fall under load, so some batches are answered after the sync, some during the outage
/// (spooled), some while the log is published again. Every one answered `200` is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_answered_200_under_load_survives_a_power_cut() {
    let mut stage = Stage::start("under_load", &[]).await;
    let senders = Senders::start(&stage, 3);

    tokio::time::sleep(Duration::from_secs(1)).await;
    let sync = stage.nats.last_sync();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stage.nats.lose_power(&sync).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = senders.stop().await;

    let extra = format!(" spooled_batches={} not_200={}", sent.spooled, sent.refused);
    stage.verdict(&sent.answered, &extra).await;
}

/// Senders posting batches one after another to the stage's service, until stopped.
struct Senders {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Sent>>,
}

impl Senders {
    fn start(stage: &Stage, senders: usize) -> Senders {
        Senders::to(&stage.url(), stage.case, senders)
    }

    /// `senders` senders of `case` posting to `url`.
    fn to(url: &str, case: &'static str, senders: usize) -> Senders {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..senders)
            .map(|s| tokio::spawn(send_until(url.to_owned(), case, s, stop.clone())))
            .collect();
        Senders { stop, tasks }
    }

    /// Stops them and adds up what they saw.
    async fn stop(self) -> Sent {
        self.stop.store(true, Ordering::Release);
        let mut all = Sent::default();
        for task in self.tasks {
            let sent = task.await.unwrap();
            all.answered.extend(sent.answered);
            all.spooled += sent.spooled;
            all.refused += sent.refused;
            all.unanswered.extend(sent.unanswered);
        }
        all
    }
}

/// What one sender saw: the keys of the events answered `200` (published or spooled), how
/// many of those batches were spooled, how many batches were not answered `200`, and the keys
/// of their events (a request cut off by a kill may still have been stored: its sender would
/// send it again).
#[derive(Default)]
struct Sent {
    answered: Vec<String>,
    spooled: usize,
    refused: usize,
    unanswered: Vec<String>,
}

/// Sender `s` of `case`: posts its batches one after another until `stop`.
async fn send_until(url: String, case: &str, s: usize, stop: Arc<AtomicBool>) -> Sent {
    let http = http_client();
    let mut sent = Sent::default();
    let mut n = s * 100_000;
    while !stop.load(Ordering::Acquire) {
        let (body, keys) = batch(case, n);
        n += 1;
        let response = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        match response {
            // A 200 whose body was cut is not a 200 the sender saw.
            Ok(r) if r.status() == 200 => match r.json::<Value>().await {
                Ok(answer) => {
                    if answer["spooled"].as_u64().unwrap_or(0) > 0 {
                        sent.spooled += 1;
                    }
                    sent.answered.extend(keys);
                }
                Err(_) => {
                    sent.refused += 1;
                    sent.unanswered.extend(keys);
                }
            },
            _ => {
                sent.refused += 1;
                sent.unanswered.extend(keys);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sent
}

// ---------------------------------------------------------------------------------------
// Inbound mails and their objects.

const MAILS: usize = 5;

/// Mail `i` of `case`: its body (text `"<case> mail <i>"`) and its two attachments, each
/// distinct and of several chunks, so that every mail has its own message and two objects of
/// its own.
fn mail(case: &str, i: usize) -> (Vec<u8>, [Vec<u8>; 2]) {
    let file = |k: usize| -> Vec<u8> {
        (0..300_000u32)
            .map(|b| (b.wrapping_mul(2_654_435_761) >> 24) as u8 ^ (i * 2 + k) as u8)
            .collect()
    };
    let files = [file(0), file(1)];
    let text = format!("{case} mail {i}");
    let body = mail_with(&[
        ("text", None, None, text.as_bytes()),
        ("attachments", None, None, b"2"),
        ("attachment1", Some("a.bin"), None, &files[0]),
        ("attachment2", Some("b.bin"), None, &files[1]),
    ]);
    (body, files)
}

/// The inbound messages of the stream, as `(Nats-Msg-Id, body)`; `None` when it cannot be read.
async fn inbound_messages(js: &jetstream::Context) -> Option<Vec<(String, Value)>> {
    let stream = js.get_stream(STREAM).await.ok()?;
    let state = stream.get_info().await.ok()?.state;
    let mut out = Vec::new();
    if state.messages == 0 {
        return Some(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        let message = match stream.get_raw_message(seq).await {
            Ok(message) => message,
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                continue
            }
            Err(_) => return None,
        };
        if !message.subject.starts_with("cmc.inbound.") {
            continue;
        }
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        out.push((id, serde_json::from_slice(&message.payload).ok()?));
    }
    Some(out)
}

/// Whether `store` holds `bytes` under their SHA-256, byte for byte.
async fn holds(store: &ObjectStore, bytes: &[u8]) -> bool {
    let read = async {
        let mut object = store.get(sha(bytes)).await.ok()?;
        let mut stored = Vec::new();
        object.read_to_end(&mut stored).await.ok()?;
        Some(stored == bytes)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), read).await,
        Ok(Some(true))
    )
}

/// What is on the bus of the mails: mails whose message and both objects are there,
/// objects there, and messages beyond the first of their `Nats-Msg-Id`.
struct MailsStored {
    mails: usize,
    objects: usize,
    duplicates: usize,
}

async fn mails_stored(js: &jetstream::Context, case: &str, mails: &[[Vec<u8>; 2]]) -> MailsStored {
    let messages = inbound_messages(js).await.unwrap_or_default();
    let ids: std::collections::HashSet<&String> = messages.iter().map(|(id, _)| id).collect();
    let store = js.get_object_store("CMC_INBOUND").await.ok();
    let mut stored = MailsStored {
        mails: 0,
        objects: 0,
        duplicates: messages.len() - ids.len(),
    };
    for (i, files) in mails.iter().enumerate() {
        let text = format!("{case} mail {i}");
        let message = messages.iter().any(|(_, body)| body["text"] == text);
        let mut objects = 0;
        if let Some(store) = &store {
            for file in files {
                if holds(store, file).await {
                    objects += 1;
                }
            }
        }
        stored.objects += objects;
        if message && objects == files.len() {
            stored.mails += 1;
        }
    }
    stored
}

/// Waits (up to `SETTLE`) until every mail of `files` is on the bus with both objects, and
/// looks again a second later.
async fn settle_mails(js: &jetstream::Context, case: &str, files: &[[Vec<u8>; 2]]) -> MailsStored {
    let deadline = Instant::now() + SETTLE;
    while mails_stored(js, case, files).await.mails < files.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    mails_stored(js, case, files).await
}

/// `MAILS` mails with two attachments each, answered `200` after the last sync (published
/// directly, or spooled while NATS was down and drained once it was back), then the power cut.
async fn mails_case(case: &'static str, answer: Answer) {
    let stage = Stage::start(case, &[]).await;
    let Stage {
        started,
        mut nats,
        http,
        service,
        ..
    } = stage;
    let sync = nats.last_sync();
    if answer == Answer::Spooled {
        nats.stop();
    }
    let url = format!("http://127.0.0.1:{}/webhooks/cmc/inbound", service.port);
    let expected = match answer {
        Answer::Published => json!({"result": "ok", "published": 1, "attachments": 2}),
        Answer::Spooled => {
            json!({"result": "ok", "published": 0, "attachments": 2, "spooled": 1})
        }
    };
    let mut files = Vec::new();
    for i in 0..MAILS {
        let (body, attached) = mail(case, i);
        let response = http
            .post(&url)
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let answer: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{case}: mail {i}: {answer}");
        assert_eq!(answer, expected, "{case}: mail {i}");
        files.push(attached);
    }
    if answer == Answer::Spooled {
        nats.launch().await;
        let drained = settle_mails(&reader(&[nats.url()]).await, case, &files).await;
        assert_eq!(
            drained.mails,
            MAILS,
            "{case}: the spool was not drained:\n{}",
            service.log_tail()
        );
    }

    nats.lose_power(&sync).await;

    let stored = settle_mails(&reader(&[nats.url()]).await, case, &files).await;
    println!(
        "case={case} answered={MAILS} stored={} duplicates={} objects={}/{} wall={:?}",
        stored.mails,
        stored.duplicates,
        stored.objects,
        2 * MAILS,
        started.elapsed()
    );
    let tail = service.log_tail();
    assert_eq!(
        stored.mails, MAILS,
        "{case}: mails answered 200 are not on the bus with both objects after the power cut; \
         the service's log ends:\n{tail}"
    );
    assert_eq!(stored.objects, 2 * MAILS);
    assert_eq!(stored.duplicates, 0, "{case}: duplicates stored:\n{tail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mail_answered_200_survives_a_power_cut_with_its_attachments() {
    mails_case("inbound", Answer::Published).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mails_drained_from_the_spool_survive_a_power_cut_after_the_drain() {
    mails_case("inbound_drained", Answer::Spooled).await;
}

// ---------------------------------------------------------------------------------------
// The spool off: what the README says a `200` then means.

/// With `spool.enabled = false` a `200` means a PubAck, which nats-server gives before it
/// syncs: the power cut loses what it had not synced (README, "What `200` means").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_spool_off_a_power_cut_loses_events_answered_200() {
    let mut stage = Stage::start("no_spool", &[("SPOOL__ENABLED", "false")]).await;
    let (case, sync) = (stage.case, stage.nats.last_sync());
    let answered = answer_batches(&stage.url(), case, 0..BATCHES / 4).await;

    stage.nats.lose_power(&sync).await;
    stage.service.wait_ready(&stage.http).await;
    // Time for anything the service might publish again (it has nothing to publish from).
    tokio::time::sleep(Duration::from_secs(2)).await;

    let stored = read_stream(&stage.reader().await, STREAM)
        .await
        .unwrap_or_default();
    let lost = missing(&stored, &answered).len();
    println!(
        "case={case} answered={} stored={} duplicates={}",
        answered.len(),
        answered.len() - lost,
        duplicates(&stored)
    );
    assert_eq!(
        lost,
        answered.len(),
        "{case}: every event answered 200 after the last sync is lost with the spool off"
    );
}

/// libfaketime: steps the service's wall clock, not its monotonic clock, when the file named
/// by `FAKETIME_TIMESTAMP_FILE` changes (read again every second).
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The service, on a wall clock a test steps by writing an offset (`+1h`, `-1h`) to the
/// returned file, in front of `nats`, with `settings`.
fn service_on_a_stepped_clock(
    nats: &NatsServer,
    dir: &std::path::Path,
    settings: &[(&str, &str)],
) -> (Service, std::path::PathBuf) {
    assert!(
        std::path::Path::new(FAKETIME).exists(),
        "{FAKETIME} is missing: apt-get install faketime (.ci/run installs it)"
    );
    let offset = dir.join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    let service = Launch::service(&dir.join("service.log"))
        .nats(&nats.url())
        .spool(&dir.join("spool"))
        .settings(settings)
        .envs(&[
            ("LD_PRELOAD", FAKETIME),
            ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
            ("FAKETIME_CACHE_DURATION", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ])
        .start();
    (service, offset)
}

/// `cmc_forwarder_retained_bytes` on the service's `/metrics`.
pub(super) async fn retained_bytes(http: &reqwest::Client, service: &Service) -> Option<f64> {
    let text = get_text(http, &service.metrics_url()).await;
    text.lines()
        .find_map(|line| line.strip_prefix("cmc_forwarder_retained_bytes "))
        .and_then(|value| value.trim().parse().ok())
}

/// Waits (up to 10 s) until the service's `cmc_forwarder_retained_bytes` (set at each check
/// of the stream, every second) is over zero, and returns it.
async fn retained_shown(http: &reqwest::Client, service: &Service) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let bytes = retained_bytes(http, service).await.unwrap_or(0.0);
        if bytes > 0.0 || Instant::now() > deadline {
            return bytes;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The service's wall clock steps an hour forward (an NTP step) after batches were
/// answered `200`; then NATS loses power. Ages are on the monotonic clock, so the records
/// are still retained and published again: every event is stored once. (Measured on the
/// wall clock, the step expired every record within seconds, and the cut lost them all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_step_forward_expires_nothing_before_a_power_cut() {
    let case = "clock_step_forward";
    let mut nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let http = http_client();
    let (mut service, offset) = service_on_a_stepped_clock(&nats, dir.path(), &[]);
    service.wait_ready(&http).await;
    let sync = nats.last_sync();
    let answered = answer_batches(&service.webhook_url(), case, 0..BATCHES).await;
    let before = retained_shown(&http, &service).await;

    std::fs::write(&offset, "+1h\n").unwrap();
    // Three checks of the stream after the step (each an occasion to expire).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = retained_bytes(&http, &service).await.unwrap_or(0.0);
    assert!(
        after >= before && before > 0.0,
        "{case}: retained bytes {before} before the step, {after} after"
    );
    nats.lose_power(&sync).await;

    let stored = settle(&[nats.url()], &answered).await;
    verdict(
        case,
        &answered,
        &stored,
        &format!(" retained_before={before} retained_after={after}"),
        &service.log_tail(),
    );
}

/// The service's wall clock steps an hour back: the retained log still expires a hold
/// (`spool.retain` 2 s, the publish timeout, a margin of 1 s) after its records were
/// written, and does not grow until `spool.max_bytes` refuses every batch. (Measured on the
/// wall clock, nothing expired for an hour.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_step_back_still_expires_the_retained_log() {
    let case = "clock_step_back";
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let http = http_client();
    let (mut service, offset) =
        service_on_a_stepped_clock(&nats, dir.path(), &[("SPOOL__RETAIN", "2s")]);
    service.wait_ready(&http).await;
    let answered = answer_batches(&service.webhook_url(), case, 0..BATCHES).await;
    let before = retained_shown(&http, &service).await;
    assert!(before > 0.0, "{case}: nothing retained");
    std::fs::write(&offset, "-1h\n").unwrap();

    let started = Instant::now();
    let mut bytes = before;
    while bytes > 0.0 && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        bytes = retained_bytes(&http, &service).await.unwrap_or(0.0);
    }
    let expired_after = started.elapsed();
    let stored = settle(&[nats.url()], &answered).await;
    verdict(
        case,
        &answered,
        &stored,
        &format!(
            " retained_before={before} retained_bytes={bytes} expired_after={expired_after:?}"
        ),
        &service.log_tail(),
    );
    assert_eq!(bytes, 0.0, "{case}: the retained log did not expire");
}

/// NATS dies silently (its host loses power: no TCP reset), so the client still says it is
/// connected for a while. The stream does not answer the retained log's checks, so nothing
/// expires however long it lasts (`spool.retain` 2 s here, waited three times over); the
/// power cut then lost what NATS acknowledged, and every event is stored again, once.
/// (Decided on the connection's state, the records expired while it looked connected.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_death_of_nats_expires_nothing() {
    let case = "silent_death";
    let mut nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let http = http_client();
    let mut service = Launch::service(&dir.path().join("service.log"))
        .nats(&nats.url())
        .spool(&dir.path().join("spool"))
        .settings(&[("SPOOL__RETAIN", "2s")])
        .start();
    service.wait_ready(&http).await;
    let sync = nats.last_sync();
    let answered = answer_batches(&service.webhook_url(), case, 0..BATCHES).await;

    nats.signal("-STOP");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let retained = retained_bytes(&http, &service).await.unwrap_or(0.0);
    nats.lose_power(&sync).await;

    let stored = settle(&[nats.url()], &answered).await;
    verdict(
        case,
        &answered,
        &stored,
        &format!(" retained_while_silent={retained}"),
        &service.log_tail(),
    );
    assert!(
        retained > 0.0,
        "{case}: the retained log expired while NATS was silent"
    );
}

/// The service talks to a leaf node; the stream lives in the hub behind it
/// (`nats.jetstream_domain`), which loses power. The server the service is connected to
/// never changed, so only the stream itself can tell: its last sequence is below what it
/// acknowledged, and what it lost is published again, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_of_the_hub_behind_a_leaf_node_loses_nothing() {
    let case = "leaf_hub";
    let dir = tempfile::tempdir().unwrap();
    let leaf_port = free_port();
    let conf = |name: &str, text: String| {
        let path = dir.path().join(format!("{name}.conf"));
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let hub_conf = conf(
        "hub",
        format!(
            "jetstream {{ domain: hub }}\nleafnodes {{ host: 127.0.0.1, port: {leaf_port} }}\n"
        ),
    );
    let mut hub = NatsServer::configured("hub", free_port(), vec!["-c".into(), hub_conf]);
    hub.launch().await;
    let leaf_conf = conf(
        "leaf",
        format!(
            "jetstream {{ domain: leaf }}\nleafnodes {{ remotes = [ {{ url: \"nats-leaf://127.0.0.1:{leaf_port}\" }} ] }}\n"
        ),
    );
    let mut leaf = NatsServer::configured("leaf", 0, vec!["-c".into(), leaf_conf]);
    leaf.launch().await;
    let http = http_client();
    let mut service = Launch::service(&dir.path().join("service.log"))
        .nats(&leaf.url())
        .spool(&dir.path().join("spool"))
        .settings(&[("NATS__JETSTREAM_DOMAIN", "hub")])
        .start();
    service
        .wait_ready_within(&http, Duration::from_secs(30))
        .await;
    let sync = hub.last_sync();
    let answered = answer_batches(&service.webhook_url(), case, 0..BATCHES).await;

    hub.lose_power(&sync).await;

    let stored = settle(&[hub.url()], &answered).await;
    verdict(case, &answered, &stored, "", &service.log_tail());
}

mod cases;
mod fs;
