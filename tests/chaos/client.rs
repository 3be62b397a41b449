//! The workload: distinct CMC batches (deliveries and bounces, in the shapes of `fixtures/`,
//! JSON and form-encoded) and, one time in [`MAIL_EVERY`], an Inbound mail (multipart, with
//! attachments of distinct contents), posted to either forwarder at random, as a load balancer
//! would. A batch or mail not answered `200` is retried, at any forwarder, until
//! [`RETRY_DEADLINE`] after its first attempt, as a sender that retries would. Every attempt
//! is recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::helpers::{fixture_entries, CLIENT_TIMEOUT};
use crate::rng::Rng;

/// A batch is given up this long after its first attempt: well inside the stream's
/// `duplicate_window` (2 minutes), so every retry is deduplicated against the earlier ones.
pub const RETRY_DEADLINE: Duration = Duration::from_secs(60);
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// Pause between two batches of one worker.
const PAUSE: Duration = Duration::from_millis(30);
/// One batch in this many is an Inbound mail.
const MAIL_EVERY: u64 = 25;
/// Attachments of a mail: 1 to this many.
const MAX_ATTACHMENTS: u64 = 3;
/// Size of an attachment, in bytes: up to a little over two of the object store's 128 KiB
/// chunks, so that some objects are more than one chunk.
const ATTACHMENT_BYTES: (u64, u64) = (200, 300_000);
const BOUNDARY: &str = "chaos-mail-boundary";
/// The mails' reception rule (the `filter` parameter).
pub const MAIL_FILTER: &str = "chaos@example.jp";

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
    /// `json`, `form`, or `multipart` (a mail).
    pub encoding: &'static str,
    /// `deliveries`, `bounces` or `inbound` (a mail).
    pub event_type: &'static str,
    /// The events' `messageId`s (each distinct in the whole campaign); none for a mail.
    pub keys: Vec<String>,
    /// What a mail must leave: its message and its objects.
    pub mail: Option<Mail>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mail {
    /// Its `subject` parameter, distinct in the whole campaign: it names the mail's message.
    pub subject: String,
    pub attachments: Vec<Attachment>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    /// The lowercase hex SHA-256 of its content: the object's name in the bucket.
    pub sha256: String,
    pub size: u64,
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
            let (batch, content_type, body) = if self.rng.below(MAIL_EVERY) == 0 {
                self.next_mail(id)
            } else {
                let (batch, content_type, body) = self.next_batch(id);
                (batch, content_type.to_owned(), body)
            };
            let path = if batch.mail.is_some() { "/inbound" } else { "" };
            self.history.lock().unwrap().batches.push(batch);
            let first = Instant::now();
            loop {
                let forwarder = self.rng.below(2) as usize;
                let url = format!("{}{path}", self.targets.lock().unwrap()[forwarder]);
                let start = self.ms();
                let sent = self
                    .http
                    .post(&url)
                    .header("content-type", content_type.as_str())
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
            mail: None,
        };
        (batch, content_type, body)
    }

    /// A multipart Inbound mail with 1 to [`MAX_ATTACHMENTS`] attachments whose contents are
    /// this mail's own (so each is an object no other mail shares).
    fn next_mail(&mut self, id: u64) -> (Batch, String, Vec<u8>) {
        let subject = format!("chaos-mail-{id:x}");
        let count = self.rng.range(1, MAX_ATTACHMENTS);
        let mut contents = Vec::new();
        let mut attachments = Vec::new();
        for i in 1..=count {
            let size = self.rng.range(ATTACHMENT_BYTES.0, ATTACHMENT_BYTES.1) as usize;
            let seed = format!("{subject} attachment {i} ");
            let content: Vec<u8> = seed.bytes().cycle().take(size).collect();
            attachments.push(Attachment {
                sha256: hex::encode(Sha256::digest(&content)),
                size: size as u64,
            });
            contents.push(content);
        }
        let headers = json!([
            {"name": "From", "value": "sender@example.com"},
            {"name": "To", "value": MAIL_FILTER},
            {"name": "Subject", "value": subject},
        ])
        .to_string();
        let count_text = count.to_string();
        let mut parts: Vec<(String, Option<String>, &[u8])> = vec![
            ("server_composition".into(), None, b"pro"),
            ("filter".into(), None, MAIL_FILTER.as_bytes()),
            ("headers".into(), None, headers.as_bytes()),
            ("subject".into(), None, subject.as_bytes()),
            ("envelope-from".into(), None, b"sender@example.com"),
            ("envelope-to".into(), None, MAIL_FILTER.as_bytes()),
            ("text".into(), None, b"a mail of the fault campaign"),
            ("attachments".into(), None, count_text.as_bytes()),
        ];
        for (i, content) in contents.iter().enumerate() {
            parts.push((
                format!("attachment{}", i + 1),
                Some(format!("file-{}.bin", i + 1)),
                content,
            ));
        }
        let mut body = Vec::new();
        for (name, filename, data) in &parts {
            body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
            body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"").as_bytes(),
            );
            if let Some(filename) = filename {
                body.extend_from_slice(
                    format!("; filename=\"{filename}\"\r\nContent-Type: application/octet-stream")
                        .as_bytes(),
                );
            }
            body.extend_from_slice(b"\r\n\r\n");
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        let batch = Batch {
            id,
            encoding: "multipart",
            event_type: "inbound",
            keys: Vec::new(),
            mail: Some(Mail {
                subject,
                attachments,
            }),
        };
        let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
        (batch, content_type, body)
    }
}
