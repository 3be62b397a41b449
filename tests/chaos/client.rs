//! The workload: distinct CMC batches (deliveries and bounces, in the shapes of `fixtures/`,
//! JSON and form-encoded) posted to either forwarder at random, as a load balancer would. A
//! batch not answered `200` is retried, at any forwarder, until [`RETRY_DEADLINE`] after its
//! first attempt, as a sender that retries would. Every attempt is recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Serialize;
use serde_json::{json, Value};

use crate::helpers::{fixture_entries, CLIENT_TIMEOUT};
use crate::rng::Rng;

/// A batch is given up this long after its first attempt: well inside the stream's
/// `duplicate_window` (2 minutes), so every retry is deduplicated against the earlier ones.
pub const RETRY_DEADLINE: Duration = Duration::from_secs(60);
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// Pause between two batches of one worker.
const PAUSE: Duration = Duration::from_millis(30);

/// `status` of an attempt that got no HTTP answer.
pub const NO_CONNECTION: u16 = 0;
pub const TIMED_OUT: u16 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub batch: u64,
    pub forwarder: usize,
    /// Milliseconds since the campaign began.
    pub start: u64,
    pub end: u64,
    /// The HTTP status, or [`NO_CONNECTION`] / [`TIMED_OUT`].
    pub status: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct Batch {
    pub id: u64,
    pub encoding: &'static str,
    pub event_type: &'static str,
    /// The events' `messageId`s (each distinct in the whole campaign).
    pub keys: Vec<String>,
}

#[derive(Default)]
pub struct History {
    pub batches: Vec<Batch>,
    pub attempts: Vec<Attempt>,
}

/// The forwarders' webhook URLs (a restarted forwarder listens on a new port).
pub type Targets = Arc<Mutex<Vec<String>>>;

pub struct Client {
    pub history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

struct Templates {
    deliveries: Value,
    bounces: Value,
}

impl Client {
    pub fn start(seed: u64, workers: usize, targets: Targets, epoch: Instant) -> Client {
        let history = Arc::new(Mutex::new(History::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let templates = Arc::new(Templates {
            deliveries: fixture_entries("deliveries-failed").1[0].clone(),
            bounces: fixture_entries("bounces-user-unknown").1[0].clone(),
        });
        let http = reqwest::Client::builder()
            .timeout(CLIENT_TIMEOUT)
            .build()
            .unwrap();
        let workers = (0..workers)
            .map(|w| {
                let worker = Worker {
                    id: w as u64,
                    rng: Rng::new(seed ^ 0x00C1_1E47_u64.wrapping_mul(w as u64 + 1)),
                    templates: templates.clone(),
                    http: http.clone(),
                    targets: targets.clone(),
                    history: history.clone(),
                    stop: stop.clone(),
                    epoch,
                };
                tokio::spawn(worker.run())
            })
            .collect();
        Client {
            history,
            stop,
            workers,
        }
    }

    /// Sends no new batch; waits until every batch begun is answered `200` or given up.
    pub async fn finish(self) -> Arc<Mutex<History>> {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers {
            worker.await.expect("client worker");
        }
        self.history
    }
}

struct Worker {
    id: u64,
    rng: Rng,
    templates: Arc<Templates>,
    http: reqwest::Client,
    targets: Targets,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    epoch: Instant,
}

impl Worker {
    async fn run(mut self) {
        let mut n = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            let id = (self.id << 32) | n;
            n += 1;
            let (batch, content_type, body) = self.next_batch(id);
            self.history.lock().unwrap().batches.push(batch);
            let first = Instant::now();
            loop {
                let forwarder = self.rng.below(2) as usize;
                let url = self.targets.lock().unwrap()[forwarder].clone();
                let start = self.ms();
                let sent = self
                    .http
                    .post(&url)
                    .header("content-type", content_type)
                    .body(body.clone())
                    .send()
                    .await;
                let status = match sent {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        // Read the body: the answer is complete only then.
                        let _ = response.bytes().await;
                        status
                    }
                    Err(e) if e.is_timeout() => TIMED_OUT,
                    Err(_) => NO_CONNECTION,
                };
                let end = self.ms();
                self.history.lock().unwrap().attempts.push(Attempt {
                    batch: id,
                    forwarder,
                    start,
                    end,
                    status,
                });
                if status == 200 || first.elapsed() >= RETRY_DEADLINE {
                    break;
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            tokio::time::sleep(PAUSE).await;
        }
    }

    fn ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn next_batch(&mut self, id: u64) -> (Batch, &'static str, Vec<u8>) {
        let event_type = if self.rng.below(2) == 0 {
            "deliveries"
        } else {
            "bounces"
        };
        let template = match event_type {
            "deliveries" => &self.templates.deliveries,
            _ => &self.templates.bounces,
        };
        let size = self.rng.range(1, 20) as usize;
        let mut keys = Vec::with_capacity(size);
        let entries: Vec<Value> = (0..size)
            .map(|i| {
                let key = format!("<chaos-{id:x}-{i}@chaos.example.com>");
                let mut entry = template.clone();
                entry["messageId"] = json!(key);
                entry["to"] = json!(format!("user-{id:x}-{i}@example.jp"));
                keys.push(key);
                entry
            })
            .collect();
        let event = json!({ event_type: entries });
        let (encoding, content_type, body) = if self.rng.below(2) == 0 {
            let body = json!({
                "server_composition": "pro",
                "event_type": event_type,
                "event": event,
            });
            (
                "json",
                "application/json",
                serde_json::to_vec(&body).unwrap(),
            )
        } else {
            let event = utf8_percent_encode(&event.to_string(), NON_ALPHANUMERIC).to_string();
            let body = format!("server_composition=pro&event_type={event_type}&event={event}");
            (
                "form",
                "application/x-www-form-urlencoded",
                body.into_bytes(),
            )
        };
        let batch = Batch {
            id,
            encoding,
            event_type,
            keys,
        };
        (batch, content_type, body)
    }
}
