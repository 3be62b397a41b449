//! Raw JetStream publisher, no HTTP: isolates what nats-server itself costs per message for
//! the message shapes the forwarder sends (`docs/performance.md`, "Where the time goes").
//!
//! ```text
//! rawpub --nats nats://127.0.0.1:4222 --server-pid <nats-server pid> --seconds 10 \
//!        --headers cmc|minimal|id|none --size 420 --inflight 4096 [--core] [--batch 100]
//! ```
//!
//! `--batch N` sends N messages, awaits all their acks, and repeats, printing the p50/p99 of
//! a batch's round trip: what one connection of the forwarder could reach at best.
//!
//! `--headers cmc` sends the forwarder's eight headers (distinct `Nats-Msg-Id` each),
//! `minimal` the two of `nats.headers = "minimal"` (`Nats-Msg-Id` and `Cmc-Batch-Id`),
//! `id` only a distinct `Nats-Msg-Id`, `none` nothing. Prints one JSON line: messages/s, and
//! CPU seconds per 1,000 messages of nats-server and of this publisher.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;

fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().map(|v| v.parse::<f64>().unwrap_or(0.0)).sum()
    });
    ticks / 100.0
}

#[tokio::main]
async fn main() {
    let mut nats = "nats://127.0.0.1:4222".to_owned();
    let (mut server_pid, mut seconds, mut headers, mut size, mut inflight, mut core) = (
        String::new(),
        10u64,
        "cmc".to_owned(),
        420usize,
        4096usize,
        false,
    );
    let mut memory = false;
    // With --batch N: N messages sent, then all their acks awaited, one batch at a time; the
    // latency of each batch is recorded (the floor under the forwarder's one-connection
    // latency, without HTTP).
    let mut batch = 0usize;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--core" || flag == "--memory" {
            core |= flag == "--core";
            memory |= flag == "--memory";
            continue;
        }
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--nats" => nats = value,
            "--server-pid" => server_pid = value,
            "--seconds" => seconds = value.parse().expect("--seconds"),
            "--headers" => headers = value,
            "--size" => size = value.parse().expect("--size"),
            "--inflight" => inflight = value.parse().expect("--inflight"),
            "--batch" => batch = value.parse().expect("--batch"),
            other => panic!("unknown flag {other}"),
        }
    }
    let client = async_nats::connect(&nats).await.expect("connect");
    let js = jetstream::new(client.clone());
    let name = format!("RAW_{}", std::process::id());
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("raw{}.>", std::process::id())],
        duplicate_window: Duration::from_secs(120),
        storage: if memory {
            stream::StorageType::Memory
        } else {
            stream::StorageType::File
        },
        ..Default::default()
    })
    .await
    .expect("stream");
    let payload = Bytes::from(vec![b'x'; size]);
    let subjects: Vec<String> = ["queued", "succeeded", "failed", "deferred"]
        .iter()
        .map(|s| format!("raw{}.deliveries.{s}", std::process::id()))
        .collect();
    let make_headers = |n: u64| {
        let mut h = HeaderMap::new();
        if headers != "none" {
            h.insert("Nats-Msg-Id", format!("{:064x}", n).as_str());
        }
        if headers == "minimal" {
            h.insert("Cmc-Batch-Id", "0193a0f2-7c1e-7d3a-9b1e-5f2a8c4d9e01");
        }
        if headers == "cmc" {
            h.insert("Content-Type", "application/json");
            h.insert("Cmc-Event-Type", "deliveries");
            h.insert("Cmc-Status", "queued");
            h.insert("Cmc-Server-Composition", "pro");
            h.insert("Cmc-Batch-Id", "0193a0f2-7c1e-7d3a-9b1e-5f2a8c4d9e01");
            h.insert("Cmc-Batch-Index", (n % 100).to_string().as_str());
            // Not sampled, as the forwarder marks the traces it starts when it exports no
            // spans (SPEC §2); nats-server does more for a sampled one.
            h.insert(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            );
        }
        h
    };
    let (server0, own0) = (cpu_seconds(&server_pid), cpu_seconds("self"));
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut sent = 0u64;
    let mut pending = VecDeque::new();
    let mut latencies_us: Vec<u64> = Vec::new();
    while batch > 0 && Instant::now() < end {
        let began = Instant::now();
        let mut acks = Vec::with_capacity(batch);
        for _ in 0..batch {
            let subject = subjects[(sent % 4) as usize].clone();
            let ack = js
                .publish_with_headers(subject, make_headers(sent), payload.clone())
                .await
                .expect("publish");
            acks.push(ack);
            sent += 1;
        }
        for ack in acks {
            ack.await.expect("ack");
        }
        latencies_us.push(began.elapsed().as_micros() as u64);
    }
    while batch == 0 && Instant::now() < end {
        let subject = subjects[(sent % 4) as usize].clone();
        if core {
            client
                .publish_with_headers(subject, make_headers(sent), payload.clone())
                .await
                .expect("publish");
        } else {
            let ack = js
                .publish_with_headers(subject, make_headers(sent), payload.clone())
                .await
                .expect("publish");
            pending.push_back(ack);
            if pending.len() >= inflight {
                pending.pop_front().unwrap().await.expect("ack");
            }
        }
        sent += 1;
    }
    for ack in pending {
        ack.await.expect("ack");
    }
    client.flush().await.expect("flush");
    let elapsed = start.elapsed().as_secs_f64();
    let per_k = |cpu: f64| cpu / sent as f64 * 1000.0;
    println!(
        "{{\"headers\":\"{headers}\",\"size\":{size},\"core\":{core},\"messages_per_s\":{:.0},\
         \"server_cpu_s_per_1k\":{:.4},\"publisher_cpu_s_per_1k\":{:.4}}}",
        sent as f64 / elapsed,
        per_k(cpu_seconds(&server_pid) - server0),
        per_k(cpu_seconds("self") - own0),
    );
    if !latencies_us.is_empty() {
        latencies_us.sort_unstable();
        let at = |p: f64| latencies_us[((latencies_us.len() - 1) as f64 * p).round() as usize];
        println!(
            "{{\"batch\":{batch},\"batches\":{},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"p999_ms\":{:.2}}}",
            latencies_us.len(),
            at(0.5) as f64 / 1000.0,
            at(0.99) as f64 / 1000.0,
            at(0.999) as f64 / 1000.0,
        );
    }
    let mut stored = js.get_stream(&name).await.expect("stream");
    let stored = stored.info().await.expect("info").state.messages;
    println!("{{\"sent\":{sent},\"stored\":{stored}}}");
    js.delete_stream(&name).await.expect("delete stream");
}
