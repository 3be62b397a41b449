//! The scenarios of issue 28, each a deterministic test against real nats-servers and the
//! real binary, with the store rolled back to its last sync as in the rest of `power`:
//!
//! 1. a sender's retry after a power-loss window (the duplicate PubAcks carry the sequences
//!    of the first publication), then the power cut;
//! 6. an R3 stream whose two other nodes, the stream leader among them, lose power together
//!    while the node the service is connected to (its only URL) keeps running;
//! 7. NATS freezes (SIGSTOP) while batches are answered `200` spooled, resumes (storing the
//!    frozen publications late, so the drainer's are answered as duplicates), the spool
//!    drains, then the power cut.
//!
//! Each prints `case=… answered=… stored=… duplicates=…` and asserts that every event
//! answered `200` is stored once ([`verdict`]). Against the previous build (`CMC_FORWARDER_BIN`)
//! case 7 loses the drained duplicates (kept from their spooling, so expired at the first check
//! after the drain) and case 6 loses every event in the rounds where the stream comes back
//! rolled back (the same server process answers, so nothing was published again); case 1
//! passed there too (a single node's restart is a new server process, and a direct retry's
//! record is new). `scripts/test` runs them in its serial phase
//! with the rest of `power::`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;

use super::*;

/// Posts batches `batches` of `case` again, exactly as they were first posted (same events,
/// so the same `Nats-Msg-Id`s), one at a time, as a sender that never saw the first answers
/// would; each must be answered `200` without spooling. Returns the duplicates the answers
/// report.
async fn retry_batches(url: &str, case: &str, batches: std::ops::Range<usize>) -> usize {
    let http = http_client();
    let mut duplicates = 0;
    for n in batches {
        let (answer, _) = post_batch(&http, url, case, n).await;
        assert_eq!(
            answer["spooled"].as_u64().unwrap_or(0),
            0,
            "{case}: retry of batch {n} spooled: {answer}"
        );
        duplicates += answer["duplicates"].as_u64().unwrap_or(0) as usize;
    }
    duplicates
}

/// Case 1: batches answered `200` after the last sync, the sender's retry of every one of them
/// (JetStream answers them as duplicates, with the sequences of the first publication), then
/// NATS loses power. What it acknowledged twice is lost once: every event is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_senders_retry_inside_the_power_loss_window_loses_nothing() {
    let mut stage = Stage::start("sender_retry", &[]).await;
    let sync = stage.nats.last_sync();
    let answered = answer_batches(&stage.url(), stage.case, 0..BATCHES).await;
    let retried = retry_batches(&stage.url(), stage.case, 0..BATCHES).await;

    assert_eq!(
        retried,
        answered.len(),
        "{}: the retries were not answered as duplicates",
        stage.case
    );

    stage.nats.lose_power(&sync).await;

    stage
        .verdict(&answered, &format!(" retry_duplicates={retried}"))
        .await;
}

/// The stream's leader and whether both followers are current, read through `js`.
async fn stream_leader(js: &jetstream::Context) -> Option<(String, bool)> {
    let info = tokio::time::timeout(Duration::from_secs(2), async {
        js.get_stream(STREAM).await.ok()?.get_info().await.ok()
    })
    .await
    .ok()??;
    let cluster = info.cluster?;
    let current = cluster.replicas.len() == 2 && cluster.replicas.iter().all(|p| p.current);
    Some((cluster.leader?, current))
}

/// Moves the stream's leadership away from `node` (leader step-downs until another node leads
/// with both followers current).
async fn lead_elsewhere(client: &async_nats::Client, js: &jetstream::Context, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match stream_leader(js).await {
            Some((leader, true)) if leader != node => return,
            Some((_, true)) => {
                let subject = format!("$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}");
                let _ = client.request(subject, "".into()).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        assert!(
            Instant::now() < deadline,
            "the stream's leadership did not move off {node}"
        );
    }
}

/// A counter or gauge of the service's `/metrics` (no labels), 0 when absent.
async fn metric(http: &reqwest::Client, service: &Service, name: &str) -> f64 {
    let text = get_text(http, &service.metrics_url()).await;
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The service's log without its colours (ANSI escapes).
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // `ESC [ … m`
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Why the service published its retained log again, once per time it did: the `reason=` of
/// its warning, or (the previous build's wording) `NewServer`.
fn replay_reasons(log: &str) -> Vec<String> {
    plain(log)
        .lines()
        .filter(|line| line.contains("published again"))
        .map(|line| match line.split("reason=").nth(1) {
            Some(reason) => reason.split_whitespace().next().unwrap_or("").to_owned(),
            None if line.contains("server process not seen before") => "NewServer".into(),
            None => "other".into(),
        })
        .collect()
}

/// One round of case 6: a 3-node cluster, an R3 stream, the service given node `n1` (B) alone,
/// the stream's leader moved to another node; the last sync of the two others, `BATCHES`
/// batches answered `200`, the two others' power cut together, both back. Counts in
/// `rolled_back` (before the verdict, so a failed round counts too) whether the stream was
/// seen rolled back: fewer messages, through B, than it had acknowledged, or the service found
/// it had lost its tail.
async fn r3_round(case: String, rolled_back_rounds: Arc<AtomicUsize>) {
    let started = Instant::now();
    let mut cluster = NatsCluster::start().await;
    let urls = cluster.urls();
    let b = cluster.nodes[0].url();
    let b_name = cluster.nodes[0].name.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (spool, log) = (dir.path().join("spool"), dir.path().join("service.log"));
    let http = http_client();
    let mut service = Service::start_with(&b, &spool, &log, &[("NATS__STREAM__REPLICAS", "3")]);
    service
        .wait_ready_within(&http, Duration::from_secs(30))
        .await;
    let client = async_nats::connect(urls.as_slice()).await.unwrap();
    let js = jetstream::new(client.clone());
    wait_replicated(&js).await;
    lead_elsewhere(&client, &js, &b_name).await;
    let (leader, _) = stream_leader(&js).await.expect("a leader");
    let syncs: Vec<LastSync> = cluster.nodes[1..]
        .iter()
        .map(NatsServer::last_sync)
        .collect();
    let answered = answer_batches(&service.webhook_url(), &case, 0..BATCHES).await;
    let replayed_before = metric(&http, &service, "cmc_forwarder_retained_replayed_total").await;
    drop(client);

    // The two other nodes, the leader among them, down together, then both back.
    for (node, sync) in cluster.nodes[1..].iter_mut().zip(&syncs) {
        node.power_off(sync);
    }
    for node in &mut cluster.nodes[1..] {
        node.launch().await;
    }

    // Through B, the fewest messages the stream holds in the first seconds after the nodes
    // are back (the service's replay, if any, fills it again within about a second).
    let through_b = reader(std::slice::from_ref(&b)).await;
    let mut fewest: Option<u64> = None;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(8) {
        if let Some(count) = message_count(&through_b).await {
            fewest = Some(fewest.map_or(count, |f| f.min(count)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stored = settle(&urls, &answered).await;
    let replayed =
        metric(&http, &service, "cmc_forwarder_retained_replayed_total").await - replayed_before;
    let reasons = replay_reasons(&service.log());
    let new_leader = stream_leader(&reader(&urls).await).await.map(|(l, _)| l);
    let lost_tail = ["RolledBack", "MarkLost", "Recreated", "Gone"];
    let rolled_back = fewest.is_some_and(|f| (f as usize) < answered.len())
        || reasons.iter().any(|r| lost_tail.contains(&r.as_str()));
    let extra = format!(
        " b={b_name} leader_before={leader} leader_after={new_leader:?} fewest_through_b={fewest:?} \
         rolled_back={rolled_back} replayed={replayed} reasons={reasons:?} wall={:?}",
        started.elapsed()
    );
    if rolled_back {
        rolled_back_rounds.fetch_add(1, Ordering::Relaxed);
    }
    verdict(&case, &answered, &stored, &extra, &service.log_tail());
}

/// Rounds of case 6, each on a cluster of its own.
const R3_ROUNDS: usize = 3;

/// Case 6: R3, the node the service is connected to (its only URL) survives while the two
/// others, the stream's leader among them, lose power together and come back. Whether the
/// stream comes back rolled back depends on which node the cluster elects; either way every
/// event is stored once. Run `R3_ROUNDS` times; every round's figures are printed, and how
/// often the stream was rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_the_services_own_node_surviving_the_others_power_cut_loses_nothing() {
    let rolled_back = Arc::new(AtomicUsize::new(0));
    let mut failed = Vec::new();
    for round in 1..=R3_ROUNDS {
        // A round of its own task, so a failed round's panic (its figures and the service's
        // log tail printed) does not hide the others'.
        let case = format!("r3_own_node_survives#{round}");
        if let Err(e) = tokio::spawn(r3_round(case, rolled_back.clone())).await {
            failed.push(format!("round {round}: {e}"));
        }
    }
    println!(
        "case=r3_own_node_survives rounds={R3_ROUNDS} rolled_back={} failed={}",
        rolled_back.load(Ordering::Relaxed),
        failed.len()
    );
    assert!(failed.is_empty(), "rounds failed: {failed:?}");
}

/// Waits (up to 30 s) until the service's spool is empty.
async fn spool_empty(http: &reqwest::Client, service: &Service) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if metric(http, service, "cmc_forwarder_spool_messages").await == 0.0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Batches answered `200` while NATS is frozen (its PubAcks late past `publish_timeout`).
const FROZEN_BATCHES: usize = 8;
/// `spool.retain` of case 7, scaled down so that the freeze outlasts it.
const FROZEN_RETAIN: [(&str, &str); 1] = [("SPOOL__RETAIN", "4s")];
/// How long NATS stays frozen: longer than `FROZEN_RETAIN` plus `publish_timeout` plus a
/// second after the batches were spooled, so a drained record aged from its spooling would
/// expire at the first check after the drain; one aged from its own PubAck is kept.
const FREEZE: Duration = Duration::from_secs(10);

/// Case 7: NATS freezes (SIGSTOP) after its last sync; batches are answered `200` spooled
/// (publish timeout); it resumes after `FREEZE` and stores the frozen publications late from
/// its socket, so the drainer's publications of the same events are answered as duplicates;
/// the spool drains; then NATS loses power (within the scaled `spool.retain` of the drain).
/// Every event is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_of_nats_while_batches_are_spooled_then_a_power_cut_loses_nothing() {
    let mut stage = Stage::start("frozen_spooled", &FROZEN_RETAIN).await;
    let sync = stage.nats.last_sync();
    let frozen = Instant::now();
    stage.nats.signal("-STOP");
    let answered = post_batches(&stage.url(), stage.case, 0..FROZEN_BATCHES, Answer::Spooled).await;
    tokio::time::sleep(FREEZE.saturating_sub(frozen.elapsed())).await;
    stage.nats.signal("-CONT");
    let resumed = Instant::now();
    let drained = stage.settle(&answered).await;
    assert!(
        missing(&drained, &answered).is_empty(),
        "{}: not on the bus after the freeze:\n{}",
        stage.case,
        stage.service.log_tail()
    );
    assert!(
        spool_empty(&stage.http, &stage.service).await,
        "{}: the spool did not drain:\n{}",
        stage.case,
        stage.service.log_tail()
    );
    let retained = retained_bytes(&stage.http, &stage.service)
        .await
        .unwrap_or(0.0);
    let (http, service) = (&stage.http, &stage.service);
    let drained_count = metric(http, service, "cmc_forwarder_spool_drained_total").await;
    let duplicates_seen = metric(http, service, "cmc_forwarder_duplicates_total").await;
    // The case itself: the frozen publications were stored late, so the drainer's were
    // answered as duplicates.
    assert!(
        duplicates_seen > 0.0,
        "{}: no publication answered as a duplicate (drained {drained_count})",
        stage.case
    );

    let cut_after_resume = resumed.elapsed();
    // The drained records are kept `FROZEN_RETAIN` + `publish_timeout` + 1 s from their PubAck
    // (after the resume): a cut later than that would test the harness's speed, not the service.
    assert!(
        cut_after_resume < Duration::from_secs(5),
        "{}: the harness was too slow: the cut comes {cut_after_resume:?} after the resume",
        stage.case
    );

    stage.nats.lose_power(&sync).await;

    let extra = format!(
        " frozen={FREEZE:?} stored_before_cut={} drained={drained_count} \
         duplicates_answered={duplicates_seen} retained_before_cut={retained} \
         cut_after_resume={cut_after_resume:?}",
        drained.keys.len()
    );
    stage.verdict(&answered, &extra).await;
}
