//! Test harness: a real `nats-server` per test (JetStream, random loopback port, temp dir) and
//! the real application on port 0, with typed helpers to post and to read the bus.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use cmc_forwarder::settings::Settings;
use cmc_forwarder::startup::Application;
use futures_util::StreamExt;
use tokio::sync::oneshot;

/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

/// A `nats-server` child process, killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into())
}

impl NatsServer {
    /// Starts a JetStream-enabled server on a port of its own choosing (`-p -1`), so that
    /// parallel tests can never race for a port.
    pub async fn start() -> NatsServer {
        let mut server = NatsServer {
            child: None,
            port: 0,
            dir: tempfile::tempdir().unwrap(),
        };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let port = if self.port == 0 {
            "-1".to_owned()
        } else {
            self.port.to_string()
        };
        let mut child = Command::new(nats_server_bin())
            .args(["-js", "-a", "127.0.0.1", "-p", &port, "-sd"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start nats-server: run the tests through scripts/test, or put nats-server on PATH");
        // Read the log until the server says where it listens and that it is ready; keep
        // draining it afterwards so the server never blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut listening = None;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.split("Listening for client connections on ").nth(1) {
                    listening = addr
                        .trim()
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok());
                }
                if line.contains("Server is ready") {
                    let _ = tx.send(listening);
                }
            }
        });
        self.child = Some(child);
        let port = rx
            .recv_timeout(WAIT)
            .ok()
            .flatten()
            .expect("nats-server did not become ready");
        self.port = port;
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (its data directory stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    #[allow(dead_code)]
    pub async fn restart(&mut self) {
        self.stop();
        self.launch().await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Which encoding a fixture is posted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enc {
    Json,
    Form,
}

impl Enc {
    pub fn content_type(self) -> &'static str {
        match self {
            Enc::Json => "application/json",
            Enc::Form => "application/x-www-form-urlencoded",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Enc::Json => "json",
            Enc::Form => "form",
        }
    }
}

pub fn fixture_path(name: &str, enc: Enc) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("{name}.{}", enc.extension()))
}

pub fn fixture(name: &str, enc: Enc) -> Vec<u8> {
    std::fs::read(fixture_path(name, enc)).unwrap()
}

/// The entries of a JSON fixture, as `serde_json` values.
pub fn fixture_entries(name: &str) -> (serde_json::Value, Vec<serde_json::Value>) {
    let body: serde_json::Value = serde_json::from_slice(&fixture(name, Enc::Json)).unwrap();
    let event_type = body["event_type"].as_str().unwrap().to_owned();
    let entries = body["event"][&event_type].as_array().unwrap().clone();
    (body, entries)
}

/// The keys of a JSON object in the order they are written (`serde_json::Map` sorts them, as
/// it does in the service, which is built without `preserve_order`).
pub fn ordered_keys(json: &[u8]) -> Vec<String> {
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some((key, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                        keys.push(key);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Keys>(json)
        .expect("a JSON object")
        .0
}

/// The keys of every entry of a JSON fixture, in the order the file writes them.
pub fn fixture_entry_keys(name: &str) -> Vec<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Body {
        event_type: String,
        event: std::collections::HashMap<String, Vec<Box<serde_json::value::RawValue>>>,
    }
    let body: Body = serde_json::from_slice(&fixture(name, Enc::Json)).unwrap();
    body.event[&body.event_type]
        .iter()
        .map(|raw| ordered_keys(raw.get().as_bytes()))
        .collect()
}

/// The running application and clients to talk to it and to NATS.
pub struct TestApp {
    pub address: String,
    pub admin_address: Option<String>,
    pub http: reqwest::Client,
    pub nats: async_nats::Client,
    pub settings: Settings,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The settings every test starts from: loopback port 0, the given NATS, short timeouts.
pub fn test_settings(nats: &NatsServer) -> Settings {
    let mut s = Settings::default();
    s.server.listen = "127.0.0.1:0".parse().unwrap();
    s.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    s.nats.servers = vec![nats.url()];
    s.nats.publish_timeout = Duration::from_secs(2);
    s.nats.connect_timeout = Duration::from_secs(2);
    s.spool.enabled = false;
    s
}

pub async fn spawn_app(nats: &NatsServer) -> TestApp {
    spawn_app_with(test_settings(nats)).await
}

pub async fn spawn_app_with(settings: Settings) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        cmc_forwarder::telemetry::init(&settings.log);
    }
    let app = Application::build(&settings)
        .await
        .expect("application builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let admin_address = app.admin_port().map(|p| format!("http://127.0.0.1:{p}"));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let nats = async_nats::connect(settings.nats.servers[0].as_str())
        .await
        .unwrap();
    TestApp {
        address,
        admin_address,
        http: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        nats,
        settings,
        stop: Some(stop),
        task: Some(task),
    }
}

impl TestApp {
    pub fn webhook_url(&self) -> String {
        format!("{}{}", self.address, self.settings.server.path)
    }

    pub async fn post(
        &self,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.http
            .post(self.webhook_url())
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_fixture(&self, name: &str, enc: Enc) -> reqwest::Response {
        self.post(enc.content_type(), fixture(name, enc)).await
    }

    /// Subscribes to `subject` and makes sure the server has registered it before returning.
    ///
    /// `flush` only proves the bytes left this client; the server may still process another
    /// connection's PUB first. It handles one connection's protocol in order, though, so once
    /// a message published after the SUB comes back, the SUB is in effect.
    pub async fn subscribe(&self, subject: &str) -> async_nats::Subscriber {
        let sub = self.nats.subscribe(subject.to_owned()).await.unwrap();
        let probe = self.nats.new_inbox();
        let mut echo = self.nats.subscribe(probe.clone()).await.unwrap();
        self.nats.publish(probe, "sync".into()).await.unwrap();
        tokio::time::timeout(WAIT, echo.next())
            .await
            .expect("subscription registered in time");
        sub
    }

    pub fn jetstream(&self) -> jetstream::Context {
        jetstream::new(self.nats.clone())
    }

    /// Every message stored in the configured stream, in sequence order.
    pub async fn stream_messages(&self) -> Vec<jetstream::message::StreamMessage> {
        let stream = self
            .jetstream()
            .get_stream(&self.settings.nats.stream.name)
            .await
            .unwrap();
        let state = stream.get_info().await.unwrap().state;
        let mut out = Vec::new();
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            out.push(stream.get_raw_message(seq).await.unwrap());
        }
        out
    }

    /// Stops the application and waits until it has drained.
    #[allow(dead_code)]
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Whether a message is NATS control traffic (JetStream API calls, request replies) rather
/// than an event; a subscription to `>` sees both.
fn is_control(message: &async_nats::Message) -> bool {
    let subject = message.subject.as_str();
    subject.starts_with("_INBOX.") || subject.starts_with("$JS.")
}

/// Receives exactly `n` event messages, failing after [`WAIT`].
pub async fn receive(sub: &mut async_nats::Subscriber, n: usize) -> Vec<async_nats::Message> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let next = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages arrived", out.len()))
            .expect("subscription open");
        if !is_control(&next) {
            out.push(next);
        }
    }
    out
}

/// Asserts that no event message arrives on `sub` within a short quiet period.
pub async fn assert_silent(sub: &mut async_nats::Subscriber) {
    let quiet = tokio::time::sleep(Duration::from_millis(300));
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            () = &mut quiet => return,
            next = sub.next() => match next {
                Some(m) if !is_control(&m) => panic!("unexpected message on {}", m.subject),
                Some(_) => {}
                None => return,
            },
        }
    }
}

/// A header's value as a string.
pub fn header(headers: &async_nats::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("header {name} missing"))
        .as_str()
        .to_owned()
}

/// The JSON body of a response.
pub async fn json(response: reqwest::Response) -> serde_json::Value {
    response.json().await.expect("JSON body")
}
