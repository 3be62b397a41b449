//! Load generator for the end-to-end benchmark (`scripts/bench`).
//!
//! Drives `POST /webhooks/cmc` at a fixed concurrency for a fixed duration over keep-alive
//! HTTP/1.1 connections, with **distinct message ids in every request** (so JetStream's
//! deduplication cannot hide the cost of storing), then prints one result line as JSON:
//! requests/s, events/s, latency percentiles, the forwarder's peak RSS and CPU time, the
//! generator's own CPU time, and the number of messages the stream holds.
//!
//! ```text
//! loadgen --url http://127.0.0.1:8080/webhooks/cmc --encoding json --batch 100 \
//!         --connections 16 --seconds 10 --pid <forwarder pid> \
//!         --nats nats://127.0.0.1:4222 --stream CMC_EVENTS [--rate 200]
//! ```
//!
//! Without `--rate` the load is closed-loop: each connection sends its next request as soon as
//! the previous one is answered, which measures saturation. With `--rate R` it is open-loop:
//! requests are due at fixed instants (R per second) whatever the answers do, handed to the
//! first free connection, and each latency is counted from the instant the request was *due*,
//! so time spent queued behind a slow answer is part of it (no coordinated omission). That is
//! the latency a sender below saturation sees.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

struct Args {
    url: String,
    encoding: String,
    batch: usize,
    connections: usize,
    seconds: u64,
    pid: Option<u32>,
    nats: Option<String>,
    stream: Option<String>,
    label: String,
    /// Open-loop request rate (requests/s); `None`: closed-loop.
    rate: Option<f64>,
}

fn parse_args() -> Args {
    let mut args = Args {
        url: "http://127.0.0.1:8080/webhooks/cmc".into(),
        encoding: "json".into(),
        batch: 100,
        connections: 16,
        seconds: 10,
        pid: None,
        nats: None,
        stream: None,
        label: String::new(),
        rate: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value,
            "--encoding" => args.encoding = value,
            "--batch" => args.batch = value.parse().expect("--batch"),
            "--connections" => args.connections = value.parse().expect("--connections"),
            "--seconds" => args.seconds = value.parse().expect("--seconds"),
            "--pid" => args.pid = Some(value.parse().expect("--pid")),
            "--nats" => args.nats = Some(value),
            "--stream" => args.stream = Some(value),
            "--label" => args.label = value,
            "--rate" => args.rate = Some(value.parse().expect("--rate")),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

/// Width of the counter written into every message id.
const COUNTER_DIGITS: usize = 20;

/// A request body with slots where a per-request counter is written, so that every entry
/// of every request has a distinct `messageId` without rebuilding the body.
struct BodyTemplate {
    bytes: Vec<u8>,
    slots: Vec<usize>,
    content_type: &'static str,
}

impl BodyTemplate {
    fn new(encoding: &str, batch: usize) -> BodyTemplate {
        let statuses = ["queued", "succeeded", "failed", "deferred"];
        let marker = "#".repeat(COUNTER_DIGITS);
        let entries: Vec<serde_json::Value> = (0..batch)
            .map(|i| {
                serde_json::json!({
                    "reason": if i % 4 == 2 { "550 5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces." } else { "" },
                    "sourceIp": "100.100.100.1",
                    "returnPath": "info@return.pro.smtps.jp",
                    "created": "2023-01-25 14:03:06",
                    "subject": "メールマガジンのテスト",
                    "apiData": "",
                    "messageId": format!("<{marker}-{i:05}@example.com>"),
                    "from": "info@example.com",
                    "to": format!("user{i:05}@example.jp"),
                    "senderIp": "100.100.100.3",
                    "status": statuses[i % 4],
                })
            })
            .collect();
        let event = serde_json::json!({ "deliveries": entries });
        let (text, content_type) = match encoding {
            "json" => (
                serde_json::json!({
                    "event_type": "deliveries",
                    "server_composition": "pro",
                    "event": event,
                })
                .to_string(),
                "application/json",
            ),
            "form" => {
                // CMC escapes < and > inside the JSON string; the counter digits survive
                // percent-encoding unchanged.
                let json = event
                    .to_string()
                    .replace('<', "\\u003C")
                    .replace('>', "\\u003E");
                let encoded: String = json
                    .bytes()
                    .map(|b| match b {
                        b'A'..=b'Z'
                        | b'a'..=b'z'
                        | b'0'..=b'9'
                        | b'-'
                        | b'_'
                        | b'.'
                        | b'*'
                        | b'#' => (b as char).to_string(),
                        b' ' => "+".into(),
                        _ => format!("%{b:02X}"),
                    })
                    .collect();
                (
                    format!("server_composition=pro&event_type=deliveries&event={encoded}"),
                    "application/x-www-form-urlencoded",
                )
            }
            other => panic!("unknown encoding {other}"),
        };
        let bytes = text.into_bytes();
        let slots = bytes
            .windows(COUNTER_DIGITS)
            .enumerate()
            .filter(|(_, w)| w.iter().all(|&b| b == b'#'))
            .map(|(i, _)| i)
            .filter({
                let mut last = None;
                move |&i| {
                    let fresh = last.is_none_or(|l: usize| i >= l + COUNTER_DIGITS);
                    if fresh {
                        last = Some(i);
                    }
                    fresh
                }
            })
            .collect::<Vec<_>>();
        assert_eq!(slots.len(), batch, "one counter slot per entry");
        BodyTemplate {
            bytes,
            slots,
            content_type,
        }
    }

    fn render(&self, counter: u64) -> Bytes {
        let mut body = self.bytes.clone();
        let digits = format!("{counter:0width$}", width = COUNTER_DIGITS);
        for &slot in &self.slots {
            body[slot..slot + COUNTER_DIGITS].copy_from_slice(digits.as_bytes());
        }
        Bytes::from(body)
    }
}

#[derive(Default)]
struct WorkerResult {
    latencies_us: Vec<u32>,
    ok: u64,
    failed: u64,
}

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Peak resident set size (VmHWM) in MB.
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Where a connection gets its next request: at once (closed loop), or the next due instant of
/// the open-loop schedule.
#[derive(Clone)]
enum Pace {
    Closed,
    Open(Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Instant>>>),
}

async fn worker(
    url: hyper::Uri,
    template: Arc<BodyTemplate>,
    counter: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    pace: Pace,
) -> WorkerResult {
    let mut result = WorkerResult::default();
    let authority = url.authority().expect("url has host:port").to_string();
    let stream = match TcpStream::connect(&authority).await {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!("loadgen: cannot connect to {authority}: {e}");
            std::process::exit(2);
        }
    };
    stream.set_nodelay(true).ok();
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    while !stop.load(Ordering::Relaxed) {
        let due = match &pace {
            Pace::Closed => Instant::now(),
            Pace::Open(schedule) => match schedule.lock().await.recv().await {
                Some(due) => due,
                None => break,
            },
        };
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let body = template.render(n);
        let request = hyper::Request::post(url.clone())
            .header("host", &authority)
            .header("content-type", template.content_type)
            .body(Full::new(body))
            .expect("request");
        let response = match sender.send_request(request).await {
            Ok(r) => r,
            Err(_) => {
                result.failed += 1;
                break;
            }
        };
        let status = response.status();
        let _ = response.into_body().collect().await;
        result
            .latencies_us
            .push(due.elapsed().as_micros().min(u32::MAX as u128) as u32);
        if status == 200 {
            result.ok += 1;
        } else {
            result.failed += 1;
        }
    }
    result
}

/// Emits the due instants of an open-loop schedule, `rate` per second, until `until`.
async fn schedule(rate: f64, until: Instant, due: tokio::sync::mpsc::Sender<Instant>) {
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    for i in 0u32.. {
        let at = start + interval * i;
        if at >= until {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        if due.send(at).await.is_err() {
            break;
        }
    }
}

async fn stream_messages(nats: &str, stream: &str) -> Option<u64> {
    let client = async_nats::connect(nats).await.ok()?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(stream).await.ok()?;
    Some(stream.get_info().await.ok()?.state.messages)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = parse_args();
    let template = Arc::new(BodyTemplate::new(&args.encoding, args.batch));
    let url: hyper::Uri = args.url.parse().expect("--url");
    let counter = Arc::new(AtomicU64::new(
        // Distinct across runs against the same stream, too.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
            * 1000,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let pid = args.pid.map(|p| p.to_string());
    let service_cpu_before = pid.as_deref().and_then(cpu_seconds);
    let self_cpu_before = cpu_seconds("self");

    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let pace = match args.rate {
        None => Pace::Closed,
        Some(rate) => {
            // Deep enough that the schedule never waits for the connections: a backlog is
            // latency the measurement must see, not a pause in the offered load.
            let (tx, rx) = tokio::sync::mpsc::channel((rate * args.seconds as f64) as usize + 1);
            tokio::spawn(schedule(rate, until, tx));
            Pace::Open(Arc::new(tokio::sync::Mutex::new(rx)))
        }
    };
    let workers: Vec<_> = (0..args.connections)
        .map(|_| {
            tokio::spawn(worker(
                url.clone(),
                template.clone(),
                counter.clone(),
                stop.clone(),
                pace.clone(),
            ))
        })
        .collect();
    match args.rate {
        // Closed loop: stop at the deadline. Open loop: the schedule ends at the deadline and
        // the workers finish what was due by then.
        None => {
            tokio::time::sleep_until(until.into()).await;
            stop.store(true, Ordering::Relaxed);
        }
        Some(_) => drop(pace),
    }
    let mut latencies = Vec::new();
    let (mut ok, mut failed) = (0u64, 0u64);
    for w in workers {
        let r = w.await.expect("worker");
        latencies.extend(r.latencies_us);
        ok += r.ok;
        failed += r.failed;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();

    let service_cpu = match (service_cpu_before, pid.as_deref().and_then(cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let self_cpu = match (self_cpu_before, cpu_seconds("self")) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let events_ok = ok * args.batch as u64;
    let stored = match (&args.nats, &args.stream) {
        (Some(nats), Some(stream)) => stream_messages(nats, stream).await,
        _ => None,
    };
    let report = serde_json::json!({
        "label": args.label,
        "encoding": args.encoding,
        "batch": args.batch,
        "connections": args.connections,
        "seconds": (elapsed * 100.0).round() / 100.0,
        "requests_ok": ok,
        "requests_failed": failed,
        "requests_per_s": (ok as f64 / elapsed).round(),
        "events_per_s": (events_ok as f64 / elapsed).round(),
        "p50_ms": percentile(&latencies, 0.50),
        "p99_ms": percentile(&latencies, 0.99),
        "p999_ms": percentile(&latencies, 0.999),
        "offered_requests_per_s": args.rate,
        "service_peak_rss_mb": args.pid.and_then(peak_rss_mb),
        "service_cpu_s_per_1k_events": service_cpu.map(|c| if events_ok > 0 { (c / events_ok as f64 * 1000.0 * 10000.0).round() / 10000.0 } else { 0.0 }),
        "service_cpu_cores": service_cpu.map(|c| (c / elapsed * 100.0).round() / 100.0),
        "loadgen_cpu_cores": self_cpu.map(|c| (c / elapsed * 100.0).round() / 100.0),
        "events_answered_200": events_ok,
        "stream_messages": stored,
    });
    println!("{report}");
}
