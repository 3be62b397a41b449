//! A randomized fault campaign in the style of Jepsen, run against the real binary and real
//! nats-servers: three nodes in a cluster with an R3 stream, two forwarders with their own
//! spools, each reaching NATS through a proxy the campaign controls; a client that sends
//! distinct batches and Inbound mails with attachments to either forwarder and retries until
//! a deadline; a nemesis that mixes faults from a seeded schedule; and a checker that reads
//! the history, the stream and the mails' objects.
//!
//! `cargo test --test chaos -- --seed N --duration 60s [--faults LIST] [--out DIR]`
//! (`scripts/chaos` runs it). `--faults` is `all`, `safe` (all but the power-loss kinds) or a
//! comma-separated list of kinds. Without `--duration` it does nothing (so that
//! `cargo test --tests` does not start a campaign). It ends with a line
//! `test result: ok. 1 passed; 0 failed` (or `FAILED`) that `scripts/test` sums, and exits
//! non-zero on any loss, duplicate or broken promise.

#[path = "../api/helpers.rs"]
#[allow(dead_code)]
mod helpers;
// helpers' `NatsServer` can put its store on lazyfs (`on_lazyfs`).
#[path = "../api/lazy_helpers.rs"]
#[allow(dead_code)]
mod lazy_helpers;

mod checker;
mod client;
mod nemesis;
mod proxy;
mod rng;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::helpers::{cluster_nodes, status_of, NatsServer};
use crate::nemesis::{Forwarder, Kind, World};

/// Size of each forwarder's spool volume: room for minutes of spooled load, small enough to
/// fill in a moment.
const VOLUME_MIB: u64 = 48;
/// How long the spools are given to drain once everything is healed. A forwarder's connection
/// that went through a black-holed proxy is only found dead by NATS pings (async-nats: every
/// 60 s, two missed), so this covers a few ping rounds.
const DRAIN: Duration = Duration::from_secs(300);

struct Args {
    seed: u64,
    duration: Duration,
    kinds: Vec<Kind>,
    /// `--faults` as given, for the replay command.
    faults: String,
    out: Option<PathBuf>,
}

fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit) = match text.strip_suffix('m') {
        Some(n) => (n, 60),
        None => (text.strip_suffix('s').unwrap_or(text), 1),
    };
    number
        .parse::<u64>()
        .ok()
        .map(|n| Duration::from_secs(n * unit))
}

fn parse_kinds(text: &str) -> Result<Vec<Kind>, String> {
    match text {
        "all" => Ok(nemesis::ALL.to_vec()),
        "safe" => Ok(nemesis::ALL
            .into_iter()
            .filter(|k| !k.is_power_loss())
            .collect()),
        list => list
            .split(',')
            .map(|name| Kind::parse(name.trim()).ok_or_else(|| format!("unknown fault {name:?}")))
            .collect(),
    }
}

/// `None`: not asked to run (no `--duration`).
fn parse_args() -> Result<Option<Args>, String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if !argv.iter().any(|a| a == "--duration") {
        return Ok(None);
    }
    let mut args = Args {
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            % 1_000_000_007,
        duration: Duration::from_secs(600),
        kinds: nemesis::ALL.to_vec(),
        faults: "all".into(),
        out: None,
    };
    let mut it = argv.into_iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--seed" => args.seed = value.parse().map_err(|_| format!("bad seed {value:?}"))?,
            "--duration" => {
                args.duration =
                    parse_duration(&value).ok_or_else(|| format!("bad duration {value:?}"))?
            }
            "--faults" => {
                args.kinds = parse_kinds(&value)?;
                args.faults = value;
            }
            "--out" => args.out = Some(PathBuf::from(value)),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.duration < Duration::from_secs(30) {
        return Err("--duration must be at least 30s".into());
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("chaos: not run (pass --duration; scripts/chaos does)");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // A panic (a node or forwarder that cannot be started, say) fails the campaign like a
    // loss would, with the same last lines.
    let passed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(campaign(&args))
    }))
    .unwrap_or(false);
    println!(
        "seed {}; replay: scripts/chaos --seed {} --duration {}s --faults {}",
        args.seed,
        args.seed,
        args.duration.as_secs(),
        args.faults
    );
    if passed {
        println!("test result: ok. 1 passed; 0 failed");
        ExitCode::SUCCESS
    } else {
        println!("test result: FAILED. 0 passed; 1 failed");
        ExitCode::FAILURE
    }
}

/// Mounts a tmpfs of `VOLUME_MIB` on `dir`; false where this process may not (it needs a
/// mount namespace of its own, which `scripts/chaos` gives it with `unshare`).
fn mount_volume(dir: &Path) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={VOLUME_MIB}m"), "tmpfs"])
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn unmount(dir: &Path) {
    let _ = Command::new("umount").arg(dir).status();
}

/// Three nodes routed to each other on fixed loopback ports, not advertising the cluster to
/// clients (so the forwarders reach NATS only through their proxies).
fn start_cluster() -> Vec<NatsServer> {
    let mut nodes = cluster_nodes("chaos", "n", &["--no_advertise"]);
    for node in &mut nodes {
        if let Err(log) = node.try_launch() {
            panic!(
                "{} did not start:\n{log}",
                node.name.as_deref().unwrap_or("a node")
            );
        }
    }
    nodes
}

/// What waits in the spool in `dir`: event messages and mails.
fn waiting(dir: &Path) -> Result<u64, cmc_forwarder::spool::SpoolError> {
    cmc_forwarder::spool::full_status(dir).map(|s| s.events.messages + s.mails.mails)
}

/// What waits in the forwarders' spools, and the spools whose status could not be read.
fn spooled(forwarders: &[Forwarder]) -> (u64, Vec<String>) {
    let (mut left, mut unreadable) = (0, Vec::new());
    for (t, forwarder) in forwarders.iter().enumerate() {
        match waiting(&forwarder.spool()) {
            Ok(n) => left += n,
            Err(e) => unreadable.push(format!("f{}: spool status: {e}", t + 1)),
        }
    }
    (left, unreadable)
}

/// The attachments of the mails sent that are in the bucket whole: read back, with the
/// SHA-256 (their name) and the size they were sent with. Each read is tried a few times (the
/// cluster has just healed).
async fn intact_objects(js: &jetstream::Context, history: &client::History) -> HashSet<String> {
    let mut intact = HashSet::new();
    let wanted: Vec<&client::Attachment> = history
        .batches
        .iter()
        .filter_map(|b| b.mail.as_ref())
        .flat_map(|m| &m.attachments)
        .collect();
    if wanted.is_empty() {
        return intact;
    }
    let Ok(Ok(store)) = tokio::time::timeout(
        Duration::from_secs(10),
        js.get_object_store(checker::BUCKET),
    )
    .await
    else {
        println!("chaos: the bucket {} cannot be read", checker::BUCKET);
        return intact;
    };
    for attachment in wanted {
        for _ in 0..5 {
            let read = tokio::time::timeout(Duration::from_secs(10), async {
                let mut object = store.get(&attachment.sha256).await.ok()?;
                let mut bytes = Vec::new();
                object.read_to_end(&mut bytes).await.ok()?;
                Some(bytes)
            })
            .await;
            if let Ok(Some(bytes)) = read {
                if bytes.len() as u64 == attachment.size
                    && hex::encode(Sha256::digest(&bytes)) == attachment.sha256
                {
                    intact.insert(attachment.sha256.clone());
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    intact
}

async fn campaign(args: &Args) -> bool {
    let quiet = (args.duration / 10).max(Duration::from_secs(10));
    let active = args.duration - quiet;
    let faults = nemesis::schedule(args.seed, active, &args.kinds);
    let kept = args.out.is_some();
    let scratch = tempfile::tempdir().unwrap();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| scratch.path().to_owned());
    std::fs::create_dir_all(&out).unwrap();
    println!(
        "chaos: seed {} duration {:?} (faults until {:?}, then quiet) faults {:?}; files in {}",
        args.seed,
        args.duration,
        active,
        args.kinds.iter().map(|k| k.name()).collect::<Vec<_>>(),
        out.display()
    );
    println!("schedule ({} faults):", faults.len());
    for fault in &faults {
        println!("  {fault}");
    }

    // The forwarders' volumes.
    let mut forwarders = Vec::new();
    let mut own_volumes = true;
    for i in 0..2 {
        let volume = scratch.path().join(format!("volume-f{}", i + 1));
        std::fs::create_dir_all(&volume).unwrap();
        let own_volume = mount_volume(&volume);
        own_volumes &= own_volume;
        std::fs::create_dir_all(volume.join("spool")).unwrap();
        forwarders.push((volume, own_volume));
    }
    let faults: Vec<_> = if own_volumes {
        faults
    } else {
        println!(
            "chaos: no tmpfs can be mounted here (run through scripts/chaos, which uses \
             `unshare -rm`): the disk-full faults are skipped"
        );
        faults
            .into_iter()
            .filter(|f| f.kind != Kind::DiskFull)
            .collect()
    };

    let nodes = start_cluster();
    let node_ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let node_urls: Vec<String> = nodes.iter().map(NatsServer::url).collect();
    let mut proxies = Vec::new();
    for _ in 0..2 {
        proxies.push(proxy::Proxy::start(node_ports.clone()).await);
    }
    let targets: client::Targets = Arc::new(Mutex::new(vec![String::new(); 2]));
    let mut world = World {
        forwarders: forwarders
            .into_iter()
            .enumerate()
            .map(|(i, (volume, own_volume))| Forwarder {
                service: None,
                volume,
                own_volume,
                log: out.join(format!("f{}.log", i + 1)),
                proxy_url: proxies[i].url(),
            })
            .collect(),
        nodes,
        proxies,
        targets: targets.clone(),
        scratch: scratch.path().to_owned(),
        anomalies: Vec::new(),
    };

    // Up: the cluster elects a meta leader, a forwarder creates the R3 stream (one that
    // starts before that exits, and is started again).
    let http = helpers::http_client();
    let deadline = Instant::now() + Duration::from_secs(60);
    for t in 0..2 {
        loop {
            let url = world.forwarders[t].start();
            targets.lock().unwrap()[t] = url;
            let service = world.forwarders[t].service.as_mut().unwrap();
            let readyz = service.readyz();
            let ready = loop {
                if status_of(&http, &readyz).await == 200 {
                    break true;
                }
                if service.child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "f{} never became ready:\n{}",
                t + 1,
                service.log_tail()
            );
            world.forwarders[t].service = None;
        }
    }
    let epoch = Instant::now();
    println!("chaos: cluster and forwarders up; load and nemesis start");

    let client = client::Client::start(args.seed, 3, targets.clone(), epoch);
    let struck = world.run(&faults, epoch).await;
    world.heal_all();
    println!(
        "[{:>7.1}s] healed; quiet until {:?}",
        epoch.elapsed().as_secs_f64(),
        args.duration
    );
    tokio::time::sleep_until((epoch + args.duration).into()).await;
    let history = client.finish().await;
    let history = Arc::try_unwrap(history)
        .ok()
        .expect("client finished")
        .into_inner()
        .unwrap();
    println!(
        "[{:>7.1}s] client done; waiting for the spools to drain",
        epoch.elapsed().as_secs_f64()
    );

    // Every spool drains (the drainer deletes a segment once it is wholly published), then
    // both forwarders are stopped with SIGTERM and must exit 0 with nothing left spooled.
    // A spool whose status cannot be read is not an empty one: the wait goes on.
    let drain_deadline = Instant::now() + DRAIN;
    loop {
        let (left, unreadable) = spooled(&world.forwarders);
        if left == 0 && unreadable.is_empty() {
            break;
        }
        if Instant::now() > drain_deadline {
            world.anomalies.push(format!(
                "{left} messages still spooled {DRAIN:?} after healing{}",
                unreadable
                    .iter()
                    .map(|e| format!("; {e}"))
                    .collect::<String>()
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "[{:>7.1}s] spools drained; stopping the forwarders",
        epoch.elapsed().as_secs_f64()
    );
    for (t, forwarder) in world.forwarders.iter_mut().enumerate() {
        if let Some(mut service) = forwarder.service.take() {
            service.signal("-TERM");
            match service
                .wait_exit(helpers::GRACE + Duration::from_secs(4))
                .await
            {
                Some(status) if status.success() => {}
                other => world.anomalies.push(format!(
                    "f{}: final SIGTERM ended in {other:?}:\n{}",
                    t + 1,
                    service.log_tail()
                )),
            }
        }
        match waiting(&forwarder.spool()) {
            Ok(0) => {}
            Ok(left) => world
                .anomalies
                .push(format!("f{}: {left} messages left in its spool", t + 1)),
            Err(e) => world
                .anomalies
                .push(format!("f{}: its spool cannot be read: {e}", t + 1)),
        }
    }

    let reader = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(&node_urls[..])
        .await
        .unwrap();
    let js = jetstream::new(reader);
    let mut stored = None;
    for _ in 0..60 {
        stored = helpers::read_stream(&js, checker::STREAM).await;
        if stored.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let Some(stored) = stored else {
        println!("chaos: the stream cannot be read");
        return false;
    };

    let mut file = std::fs::File::create(out.join("history.jsonl")).unwrap();
    for attempt in &history.attempts {
        serde_json::to_writer(&mut file, attempt).unwrap();
        file.write_all(b"\n").unwrap();
    }
    let mut file = std::fs::File::create(out.join("batches.jsonl")).unwrap();
    for batch in &history.batches {
        serde_json::to_writer(&mut file, batch).unwrap();
        file.write_all(b"\n").unwrap();
    }

    let intact = intact_objects(&js, &history).await;
    let verdict = checker::check(&history, &stored, &intact, &struck);
    println!("== chaos: seed {}", args.seed);
    println!("faults struck:");
    for kind in &args.kinds {
        let n = struck.iter().filter(|s| s.kind == *kind).count();
        println!("  {:<18} {n}", kind.name());
    }
    for line in &verdict.lines {
        println!("{line}");
    }
    for anomaly in &world.anomalies {
        println!("anomaly: {anomaly}");
    }
    if verdict.mails_answered == 0 {
        world
            .anomalies
            .push("no mail was answered 200: nothing proved about mails".into());
    }
    let passed = verdict.lost == 0 && verdict.duplicated == 0 && world.anomalies.is_empty();
    for f in &world.forwarders {
        if f.own_volume {
            unmount(&f.volume);
        }
    }
    if kept {
        println!("history: {}", out.join("history.jsonl").display());
    }
    drop(world);
    passed
}
