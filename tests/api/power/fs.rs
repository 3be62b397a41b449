//! Power loss at the file-system level for the real binary (issue 28): every nats-server store
//! on a `lazyfs` mount ([`NatsServer::on_lazyfs`]), and the cut a SIGKILL followed by lazyfs
//! dropping everything the server never synced ([`NatsServer::power_cut`]), then a start on
//! the same store and port. Unlike the copied-back store of the cases above, what is left is
//! what a real cut leaves: each file's synced bytes and each synced directory entry, so the
//! stream itself can be gone (nats-server syncs neither its configuration files nor, with its
//! default `sync_interval`, its blocks), or keep a block with a torn tail.
//!
//! The cases: the single node, with a plain and a torn cut, and torn after the store was made
//! durable halfway; the shared host (the service's spool on lazyfs too, the service SIGKILLed
//! and its mount dropped at the same moment), also torn under load; a second cut halfway
//! through the replay; a 3-node cluster with an R3 stream, every store on lazyfs, all three cut
//! at once, also torn after every store was made durable halfway. Each prints
//! `case=… answered=… stored=… duplicates=…` with what lazyfs had not synced before the cut
//! (`unsynced=[…]`) and what the cut dropped (`cut=[…]`), and requires every event answered
//! `200` to be in the stream once. One more cuts without the retained log
//! (`spool.retain = 0s`) and requires the loss, so the cut is known to bite.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{
    answer_batches, assert_in_the_middle, duplicates, missing, past_half, reader, settle,
    stream_created, verdict, wait_replicated, Senders, BATCHES, STREAM,
};
use crate::helpers::*;
use crate::lazy_helpers::LazyMount;

/// The seed of the torn cut: the same seed tears the same way (`LAZYFS_TEAR_SEED` for another).
fn tear_seed() -> u64 {
    std::env::var("LAZYFS_TEAR_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261208)
}

/// How a single-node case cuts the power.
#[derive(Clone, Copy, Default)]
struct Cut {
    /// `drop-tear <seed>` instead of `drop`: each file's last unsynced write keeps a prefix.
    tear: Option<u64>,
    /// The whole store made durable (lazyfs `sync-all`, as if nats-server had synced it) after
    /// half the batches: the stream survives the cut, its blocks keep the first half and lose
    /// (or, torn, keep a piece of) the rest.
    durable_halfway: bool,
    /// The service on the same host: its spool on lazyfs as well, the service SIGKILLed and
    /// its mount dropped at the same moment as NATS's; started again once NATS is back.
    shared_host: bool,
    /// Three senders posting batches one after another through the cut (and on, once
    /// everything is back, for a second), instead of `BATCHES` answered before it.
    under_load: bool,
    /// The service's settings beyond the tests' defaults.
    settings: &'static [(&'static str, &'static str)],
}

/// The service (spool on, default `spool.retain`) in front of `nats_urls`, ready.
async fn serve(
    http: &reqwest::Client,
    urls: &str,
    spool: &Path,
    log: &Path,
    settings: &[(&str, &str)],
) -> Service {
    let mut service = Service::start_with(urls, spool, log, settings);
    service.wait_ready(http).await;
    service
}

/// What a case ends with: the events answered `200`, those of batches sent but not answered
/// `200` (under load), what the stream holds after recovery, the figures to print beyond
/// `verdict`'s, and the service's log tail.
struct Outcome {
    answered: Vec<String>,
    unanswered: Vec<String>,
    stored: Stored,
    extra: String,
    log_tail: String,
}

/// [`cut_single_node`], then the verdict: every event answered `200` stored once.
async fn single_node(case: &'static str, cut: Cut) {
    let mut o = cut_single_node(case, cut).await;
    let extra = set_aside_unanswered(case, &mut o.stored, &o.unanswered) + &o.extra;
    verdict(case, &o.answered, &o.stored, &extra, &o.log_tail);
}

/// Takes out of `stored` the events of batches sent but not answered `200` (the request was
/// cut off by the kill: the service may have published it and kept it in its retained log,
/// and then publishes it again after the cut; its sender would send it again, de-duplicated),
/// after asserting that each of them is stored at most once. Returns ` unanswered_stored=…`.
fn set_aside_unanswered(case: &str, stored: &mut Stored, unanswered: &[String]) -> String {
    let mut kept = 0;
    for key in unanswered {
        if let Some(n) = stored.keys.remove(key) {
            assert_eq!(
                n, 1,
                "{case}: an event of an unanswered batch stored {n} times"
            );
            kept += 1;
        }
    }
    format!(" unanswered={} unanswered_stored={kept}", unanswered.len())
}

/// A single nats-server with its store on lazyfs and the service: `BATCHES` batches answered
/// `200`, the power cut, recovery (up to `SETTLE` for every event to be back).
async fn cut_single_node(case: &'static str, cut: Cut) -> Outcome {
    // Arrange: the spool's mount (if any) is declared first, so it outlives the service.
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (spool, log) = (dir.path().join("spool"), dir.path().join("service.log"));
    let mut spool_mount = cut.shared_host.then(|| LazyMount::start(&spool));
    let mut nats = NatsServer::start_on_lazyfs().await;
    let http = http_client();
    let mut service = serve(&http, &nats.url(), &spool, &log, cut.settings).await;
    let url = service.webhook_url();
    let (mut answered, mut unanswered) = (Vec::new(), Vec::new());
    let senders = cut.under_load.then(|| Senders::to(&url, case, 3));
    if cut.under_load {
        tokio::time::sleep(Duration::from_secs(2)).await;
    } else {
        answered = answer_batches(&url, case, 0..BATCHES / 2).await;
        if cut.durable_halfway {
            nats.lazy().command("sync-all");
        }
        answered.extend(answer_batches(&url, case, BATCHES / 2..BATCHES).await);
    }
    let created = stream_created(&[nats.url()]).await;
    let unsynced = nats.lazy().stats();
    let spool_unsynced = match &mut spool_mount {
        Some(mount) => format!(" spool_unsynced=[{}]", mount.command("entries")),
        None => String::new(),
    };

    // Act: the power cut.
    let cuts = match &mut spool_mount {
        None => nats.power_cut(cut.tear).await,
        Some(mount) => {
            service.signal("-KILL");
            let nats_cut = nats.power_cut_off(cut.tear);
            service.wait_exit(WAIT).await.expect("SIGKILLed");
            let spool_cut = match cut.tear {
                Some(seed) => mount.power_cut_torn(seed),
                None => mount.power_cut(),
            };
            nats.launch().await;
            service = Service::start_with(&nats.url(), &spool, &log, cut.settings);
            format!("{nats_cut}] spool_cut=[{spool_cut}")
        }
    };

    let mut load = String::new();
    if let Some(senders) = senders {
        service.wait_ready(&http).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sent = senders.stop().await;
        load = format!(" spooled_batches={} not_200={}", sent.spooled, sent.refused);
        answered = sent.answered;
        unanswered = sent.unanswered;
    }

    // Assert
    let stored = settle(&[nats.url()], &answered).await;
    let recreated = created != stream_created(&[nats.url()]).await;
    let seed = cut.tear.map(|s| format!(" seed={s}")).unwrap_or_default();
    let extra = format!(
        " recreated={recreated}{seed}{load} unsynced=[{unsynced}]{spool_unsynced} cut=[{cuts}] \
         wall={:?}",
        started.elapsed()
    );
    Outcome {
        answered,
        unanswered,
        stored,
        extra,
        log_tail: service.log_tail(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_answered_200_survives_a_file_system_power_cut_of_the_nats_host() {
    single_node("fs_single_node", Cut::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_answered_200_survives_a_torn_file_system_power_cut_of_the_nats_host() {
    let cut = Cut {
        tear: Some(tear_seed()),
        ..Cut::default()
    };
    single_node("fs_torn", cut).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_answered_200_survives_a_torn_power_cut_of_a_store_synced_halfway() {
    let cut = Cut {
        tear: Some(tear_seed()),
        durable_halfway: true,
        ..Cut::default()
    };
    single_node("fs_torn_synced_halfway", cut).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_answered_200_survives_a_file_system_power_cut_of_a_host_running_both() {
    let cut = Cut {
        shared_host: true,
        ..Cut::default()
    };
    single_node("fs_shared_host", cut).await;
}

/// The shared host cut under load, torn: requests in flight when both processes die, the
/// spool's and the retained log's last writes torn on the service's mount, NATS's on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_answered_200_under_load_survives_a_torn_power_cut_of_a_host_running_both() {
    let cut = Cut {
        tear: Some(tear_seed()),
        shared_host: true,
        under_load: true,
        ..Cut::default()
    };
    single_node("fs_shared_host_load_torn", cut).await;
}

/// NATS loses power a second time while the service publishes its log again (in the middle
/// of a drain step, once half of it is back): with nothing synced in between, the stream is gone
/// again, and the part of the replay NATS had acknowledged must come back with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_file_system_power_cut_during_the_replay_loses_nothing() {
    let case = "fs_double_cut";
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (spool, log) = (dir.path().join("spool"), dir.path().join("service.log"));
    let mut nats = NatsServer::start_on_lazyfs().await;
    let http = http_client();
    let service = serve(&http, &nats.url(), &spool, &log, &[]).await;
    let answered = answer_batches(&service.webhook_url(), case, 0..5 * BATCHES).await;

    let first = nats.power_cut(None).await;
    let at_second_cut = past_half(&reader(&[nats.url()]).await, answered.len(), true).await;
    let second = nats.power_cut(None).await;

    let stored = settle(&[nats.url()], &answered).await;
    let extra = format!(
        " stored_at_second_cut={at_second_cut} first_cut=[{first}] second_cut=[{second}] \
         wall={:?}",
        started.elapsed()
    );
    verdict(case, &answered, &stored, &extra, &service.log_tail());
    assert_in_the_middle(case, "the second cut", at_second_cut, answered.len());
}

/// The same cut without the retained log (`spool.retain = 0s`: a `200` is a PubAck): the
/// events answered `200` are lost, which shows that the cut really takes what nats-server
/// acknowledged, and that the retained log is what brings it back in the cases above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_retained_log_a_file_system_power_cut_loses_events_answered_200() {
    let case = "fs_no_retain";
    let cut = Cut {
        settings: &[("SPOOL__RETAIN", "0s")],
        ..Cut::default()
    };
    let o = cut_single_node(case, cut).await;
    let lost = missing(&o.stored, &o.answered).len();
    println!(
        "case={case} answered={} stored={} duplicates={} lost={lost}{}",
        o.answered.len(),
        o.answered.len() - lost,
        duplicates(&o.stored),
        o.extra
    );
    assert!(lost > 0, "{case}: the cut lost nothing NATS acknowledged");
}

/// A 3-node cluster with every store on lazyfs and the service with an R3 stream: `BATCHES`
/// batches answered `200`, every node cut at once (all down before any comes back), recovery,
/// the verdict. `cut.durable_halfway` and `cut.tear` as for the single node, on every node.
async fn cluster(case: &'static str, cut: Cut) {
    let started = Instant::now();
    let mut cluster = NatsCluster::start_on_lazyfs().await;
    let urls = cluster.urls();
    let dir = tempfile::tempdir().unwrap();
    let (spool, log) = (dir.path().join("spool"), dir.path().join("service.log"));
    let http = http_client();
    let replicas = [("NATS__STREAM__REPLICAS", "3")];
    let service = serve(&http, &urls.join(","), &spool, &log, &replicas).await;
    wait_replicated(&reader(&urls).await).await;
    let url = service.webhook_url();
    let mut answered = answer_batches(&url, case, 0..BATCHES / 2).await;
    if cut.durable_halfway {
        wait_replicated(&reader(&urls).await).await;
        for node in &mut cluster.nodes {
            node.lazy().command("sync-all");
        }
    }
    answered.extend(answer_batches(&url, case, BATCHES / 2..BATCHES).await);
    let created = stream_created(&urls).await;
    let unsynced: Vec<String> = cluster.nodes.iter_mut().map(|n| n.lazy().stats()).collect();

    let cuts: Vec<String> = cluster
        .nodes
        .iter_mut()
        .map(|node| node.power_cut_off(cut.tear))
        .collect();
    for node in &mut cluster.nodes {
        node.launch().await;
    }

    let stored = settle(&urls, &answered).await;
    let after = reader(&urls).await.get_stream(STREAM).await;
    let replicas = after
        .map(|s| s.cached_info().config.num_replicas)
        .unwrap_or(0);
    let recreated = created != stream_created(&urls).await;
    let seed = cut.tear.map(|s| format!(" seed={s}")).unwrap_or_default();
    let extra = format!(
        " recreated={recreated} replicas={replicas}{seed} unsynced=[{}] cut=[{}] wall={:?}",
        unsynced.join(" | "),
        cuts.join(" | "),
        started.elapsed()
    );
    verdict(case, &answered, &stored, &extra, &service.log_tail());
    assert_eq!(replicas, 3, "{case}: the stream is R3 after recovery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_answered_200_survives_a_file_system_power_cut_of_a_whole_r3_cluster() {
    cluster("fs_cluster_r3", Cut::default()).await;
}

/// Every node's store made durable halfway, then all three cut at once, torn: the R3 stream
/// survives with the first half on every node (its Raft logs too), the rest must come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_answered_200_survives_a_torn_cut_of_an_r3_cluster_synced_halfway() {
    let cut = Cut {
        tear: Some(tear_seed()),
        durable_halfway: true,
        ..Cut::default()
    };
    cluster("fs_cluster_r3_torn_synced_halfway", cut).await;
}
