//! Test harness: a real `nats-server` per test (JetStream, random loopback port, temp dir) and
//! the real application on port 0, with typed helpers to post and to read the bus.

use std::collections::{HashMap, HashSet};
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use cmc_forwarder::settings::Settings;
use cmc_forwarder::startup::Application;
use futures_util::StreamExt;
use tokio::sync::oneshot;

use crate::lazy_helpers::LazyMount;

/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);
/// Every HTTP request of the fault and pipeline tests is bounded by this: hitting it means
/// the service hung.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A `nats-server` child process (JetStream, loopback), killed on drop; its data directory
/// lives as long as it does, so a restart keeps the streams.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    /// Server name (`-n`), for cluster nodes.
    pub name: Option<String>,
    /// More command-line arguments (cluster routes, `-c` for a configuration file).
    pub args: Vec<String>,
    /// lazyfs mounted over the store ([`Self::on_lazyfs`]): declared before `dir`, so it is
    /// unmounted (after the server is killed) before the directory is removed.
    lazy: Option<LazyMount>,
    dir: tempfile::TempDir,
}

/// The `nats-server` to run: `NATS_SERVER_BIN`, else the one on PATH.
pub fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into())
}

/// The forwarder binary the process tests run: `CMC_FORWARDER_BIN` (a release build, to
/// measure its memory), else this build's.
pub fn forwarder_bin() -> String {
    std::env::var("CMC_FORWARDER_BIN")
        .ok()
        .filter(|bin| !bin.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_cmc-forwarder").to_owned())
}

impl NatsServer {
    /// Starts a JetStream-enabled server on a port of its own choosing (`-p -1`), so that
    /// parallel tests can never race for a port.
    pub async fn start() -> NatsServer {
        let mut server = NatsServer::configured_anonymous(0, Vec::new());
        server.launch().await;
        server
    }

    fn configured_anonymous(port: u16, args: Vec<String>) -> NatsServer {
        NatsServer {
            child: None,
            port,
            name: None,
            args,
            lazy: None,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// [`Self::start`] with the store on lazyfs ([`Self::on_lazyfs`]).
    pub async fn start_on_lazyfs() -> NatsServer {
        let mut server = NatsServer::configured_anonymous(0, Vec::new());
        server.on_lazyfs();
        server.launch().await;
        server
    }

    /// Mounts lazyfs over the store (`<dir>/jetstream`), before the first launch, so that
    /// [`Self::power_cut`] can drop what the server never synced.
    pub fn on_lazyfs(&mut self) {
        assert!(self.child.is_none(), "mount lazyfs before the launch");
        self.lazy = Some(LazyMount::start(&self.dir.path().join("jetstream")));
    }

    /// The lazyfs mount under the store (for `stats`, `sync-all`).
    pub fn lazy(&mut self) -> &mut LazyMount {
        self.lazy.as_mut().expect("the store is on lazyfs")
    }

    /// A power cut at the file-system level: SIGKILL, then every write and directory entry the
    /// server never synced dropped (with `tear`, each file's last unsynced write torn to a
    /// prefix drawn from that seed); not started again, so that every node of a cluster is
    /// down before any comes back. Returns lazyfs's answer.
    pub fn power_cut_off(&mut self, tear: Option<u64>) -> String {
        self.stop();
        let lazy = self.lazy();
        match tear {
            Some(seed) => lazy.power_cut_torn(seed),
            None => lazy.power_cut(),
        }
    }

    /// [`Self::power_cut_off`], then started again on the same store and port.
    pub async fn power_cut(&mut self, tear: Option<u64>) -> String {
        let cut = self.power_cut_off(tear);
        self.launch().await;
        cut
    }

    /// A server named `name` on `port` with more `args`, not started yet ([`Self::launch`]).
    pub fn configured(name: &str, port: u16, args: Vec<String>) -> NatsServer {
        let mut server = NatsServer::configured_anonymous(port, args);
        server.name = Some(name.to_owned());
        server
    }

    /// The data directory (for a configuration file to pass with `-c`).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The process id, for signals (SIGSTOP, SIGCONT).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("nats-server runs").id()
    }

    /// Starts the server and waits until it is ready (on a port of its choosing the first
    /// time when none was given, on the same port afterwards). Panics with the server's own
    /// log when it does not come up.
    pub async fn launch(&mut self) {
        if let Err(log) = self.try_launch() {
            panic!("nats-server did not become ready; its log:\n{log}");
        }
    }

    /// [`Self::launch`], returning the server's log instead of panicking when it exits or
    /// is not ready within [`WAIT`] (a port taken in the meantime, say).
    pub fn try_launch(&mut self) -> Result<(), String> {
        let port = if self.port == 0 {
            "-1".to_owned()
        } else {
            self.port.to_string()
        };
        let mut command = Command::new(nats_server_bin());
        command.args(["-js", "-a", "127.0.0.1", "-p", &port, "-sd"]);
        command.arg(self.dir.path().join("jetstream"));
        if let Some(name) = &self.name {
            command.args(["-n", name]);
        }
        let mut child = command
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start nats-server: run the tests through scripts/test, or put nats-server on PATH");
        // Read the log until the server says where it listens and that it is ready; keep
        // draining it afterwards so the server never blocks on a full pipe. Until then the
        // lines are kept, to show why a server did not come up.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut listening = None;
            let mut ready = false;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !ready {
                    let mut kept = kept.lock().unwrap();
                    kept.push_str(&line);
                    kept.push('\n');
                }
                if let Some(addr) = line.split("Listening for client connections on ").nth(1) {
                    listening = addr
                        .trim()
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok());
                }
                if line.contains("Server is ready") {
                    ready = true;
                    let _ = tx.send(listening);
                }
            }
        });
        match rx.recv_timeout(WAIT).ok().flatten() {
            Some(port) => {
                self.child = Some(child);
                self.port = port;
                Ok(())
            }
            None => {
                let _ = child.kill();
                let status = child.wait().ok();
                let log = log.lock().unwrap().clone();
                Err(format!("{log}(exit: {status:?})"))
            }
        }
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
    pub async fn restart(&mut self) {
        self.stop();
        self.launch().await;
    }

    /// Sends `signal` (`-STOP`, `-CONT`, `-KILL`, ...) to the running server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} nats-server failed");
    }

    /// The server's store as a power cut now would leave it if this were its last sync: copied
    /// while the process is paused (SIGSTOP), so the copy is one moment of everything it had
    /// written, then resumed. nats-server syncs lazily (every 2 minutes by default), so after
    /// a real power cut its store is such a copy from some earlier moment.
    pub fn last_sync(&self) -> LastSync {
        let copy = tempfile::tempdir().unwrap();
        self.signal("-STOP");
        let store = self.dir.path().join("jetstream");
        let copied = !store.exists() || copy_dir(&store, &copy.path().join("jetstream"));
        self.signal("-CONT");
        assert!(copied, "cannot copy the store of nats-server");
        LastSync { copy }
    }

    /// A power cut: the server killed, its store put back to `sync` (what it had synced, all
    /// it wrote since lost), and started again on the same port.
    pub async fn lose_power(&mut self, sync: &LastSync) {
        self.power_off(sync);
        self.launch().await;
    }

    /// The first half of [`Self::lose_power`]: killed, its store put back to `sync`, not
    /// started again (so that every node of a cluster is down before any comes back).
    pub fn power_off(&mut self, sync: &LastSync) {
        self.stop();
        let store = self.dir.path().join("jetstream");
        if store.exists() {
            std::fs::remove_dir_all(&store).unwrap();
        }
        let synced = sync.copy.path().join("jetstream");
        if synced.exists() {
            assert!(copy_dir(&synced, &store), "cannot restore the store");
        }
    }
}

/// A copy of a nats-server's store: what it had synced at the moment
/// [`NatsServer::last_sync`] was called.
pub struct LastSync {
    copy: tempfile::TempDir,
}

/// `cp -a from to`: a directory tree with its files as they are.
fn copy_dir(from: &Path, to: &Path) -> bool {
    Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .is_ok_and(|s| s.success())
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
        subscribe_registered(&self.nats, subject).await
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

/// Subscribes `client` to `subject` and makes sure the server has registered it before
/// returning (see [`TestApp::subscribe`]): `flush` alone only proves the bytes left the client.
pub async fn subscribe_registered(
    client: &async_nats::Client,
    subject: &str,
) -> async_nats::Subscriber {
    let sub = client.subscribe(subject.to_owned()).await.unwrap();
    let probe = client.new_inbox();
    let mut echo = client.subscribe(probe.clone()).await.unwrap();
    client.publish(probe, "sync".into()).await.unwrap();
    tokio::time::timeout(WAIT, echo.next())
        .await
        .expect("subscription registered in time");
    sub
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
/// The `X-Request-Id` (the batch id) of a response that must be `200`.
pub fn request_id_of_200(response: &reqwest::Response) -> String {
    assert_eq!(response.status(), 200);
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

pub async fn json(response: reqwest::Response) -> serde_json::Value {
    response.json().await.expect("JSON body")
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The peak resident set (`VmHWM`) of process `pid`, in KiB.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// The body of a `GET url` (an admin page such as `/metrics`), as text.
pub async fn get_text(http: &reqwest::Client, url: &str) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Processes: a 3-node cluster, the real binary, and the in-process application when
// `spawn_app_with` does not fit.

/// Three JetStream nodes `n1`..`n3` routed to each other on free loopback ports.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub async fn start() -> NatsCluster {
        NatsCluster::start_with(false)
    }

    /// [`Self::start`] with every node's store on lazyfs ([`NatsServer::on_lazyfs`]).
    pub async fn start_on_lazyfs() -> NatsCluster {
        NatsCluster::start_with(true)
    }

    fn start_with(lazy: bool) -> NatsCluster {
        // The six ports are chosen before any node binds them, so another process can take
        // one in between: then the cluster is started again on fresh ports.
        let mut failures = Vec::new();
        for _ in 0..3 {
            match NatsCluster::try_start(lazy) {
                Ok(cluster) => return cluster,
                Err(log) => failures.push(log),
            }
        }
        panic!(
            "the cluster did not come up in 3 tries:\n{}",
            failures.join("\n---\n")
        );
    }

    fn try_start(lazy: bool) -> Result<NatsCluster, String> {
        let mut nodes = cluster_nodes("cmc", "n", &[]);
        for node in &mut nodes {
            if lazy {
                node.on_lazyfs();
            }
            node.try_launch()?;
        }
        Ok(NatsCluster { nodes })
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    pub fn kill(&mut self, name: &str) {
        self.nodes
            .iter_mut()
            .find(|n| n.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no node {name}"))
            .stop();
    }
}

/// Three nats-servers configured (not started) as one cluster `cluster_name` on fresh loopback
/// ports, each routed to the other two, named `<prefix>1` to `<prefix>3`, with `extra` arguments.
pub fn cluster_nodes(cluster_name: &str, prefix: &str, extra: &[&str]) -> Vec<NatsServer> {
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    ports
        .iter()
        .enumerate()
        .map(|(i, (port, cluster_port))| {
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, c))| format!("nats://127.0.0.1:{c}"))
                .collect();
            let mut args = vec![
                "--cluster_name".into(),
                cluster_name.to_owned(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{cluster_port}"),
                "--routes".into(),
                routes.join(","),
            ];
            args.extend(extra.iter().map(|a| (*a).to_owned()));
            NatsServer::configured(&format!("{prefix}{}", i + 1), *port, args)
        })
        .collect()
}

/// The application run in this process (for when NATS is not there at start-up, where
/// `spawn_app_with`'s own NATS client cannot connect).
pub struct InProc {
    pub address: String,
    pub admin: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProc {
    pub fn run(app: Application, path: &str) -> InProc {
        let address = format!("http://127.0.0.1:{}{path}", app.port());
        let admin = format!("http://127.0.0.1:{}", app.admin_port().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        InProc {
            address,
            admin,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the application stopped in time")
                .unwrap();
        }
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The settings of the in-process tests, as `test_settings` but for any servers.
pub fn settings_for(servers: Vec<String>) -> Settings {
    let mut s = Settings::default();
    s.server.listen = "127.0.0.1:0".parse().unwrap();
    s.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    s.nats.servers = servers;
    s.nats.publish_timeout = Duration::from_secs(1);
    s.nats.connect_timeout = Duration::from_secs(1);
    s.spool.enabled = false;
    s
}

/// The status of `GET url` (0 when it cannot be reached).
pub async fn status_of(http: &reqwest::Client, url: &str) -> u16 {
    match http.get(url).send().await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

pub async fn wait_for_status(http: &reqwest::Client, url: &str, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = status_of(http, url).await;
        if now == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} stayed {now}, expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real `cmc-forwarder` binary, configured through the environment, killed on drop.
pub struct Service {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    log: PathBuf,
}

/// Grace given to in-flight requests after SIGTERM (`server.shutdown_grace`).
pub const GRACE: Duration = Duration::from_secs(5);

/// The binary as a command with none of the test run's own `CMC_FORWARDER*` variables, so
/// what a test sets is all the process sees: the base of [`Launch`], and of the one-shot
/// commands (`check-config`, `spool status|drain|requeue`).
pub fn forwarder_command() -> Command {
    let mut command = Command::new(forwarder_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CMC_FORWARDER") {
            command.env_remove(key);
        }
    }
    command
}

/// How every process test starts the real binary: one builder, so each process gets a clean
/// environment ([`forwarder_command`]), loopback ports of its own, and its stderr in a log.
///
/// [`Launch::service`] configures it through the environment, with the tests' defaults;
/// [`Launch::config_file`] through `--config`, the file naming the ports.
pub struct Launch {
    command: Command,
    port: u16,
    admin_port: u16,
    log: PathBuf,
}

impl Launch {
    /// Settings from the environment: fresh listen and admin ports, NATS timeouts of 1 s and
    /// 2 s, `shutdown_grace` [`GRACE`], the spool on, `RUST_LOG=warn`.
    pub fn service(log: &Path) -> Launch {
        let (port, admin_port) = (free_port(), free_port());
        let mut launch = Launch::with_ports(forwarder_command(), port, admin_port, log);
        launch
            .command
            .env("RUST_LOG", "warn")
            .env("CMC_FORWARDER__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "CMC_FORWARDER__ADMIN__LISTEN",
                format!("127.0.0.1:{admin_port}"),
            )
            .env("CMC_FORWARDER__NATS__PUBLISH_TIMEOUT", "1s")
            .env("CMC_FORWARDER__NATS__CONNECT_TIMEOUT", "2s")
            .env(
                "CMC_FORWARDER__SERVER__SHUTDOWN_GRACE",
                format!("{}s", GRACE.as_secs()),
            )
            .env("CMC_FORWARDER__SPOOL__ENABLED", "true");
        launch
    }

    /// `--config file`, which must name `port` and `admin_port` as its listeners; nothing else
    /// from the environment (no `RUST_LOG`: the file's `log.level` decides).
    pub fn config_file(config: &Path, port: u16, admin_port: u16, log: &Path) -> Launch {
        let mut command = forwarder_command();
        command.arg("--config").arg(config).env_remove("RUST_LOG");
        Launch::with_ports(command, port, admin_port, log)
    }

    fn with_ports(command: Command, port: u16, admin_port: u16, log: &Path) -> Launch {
        Launch {
            command,
            port,
            admin_port,
            log: log.to_owned(),
        }
    }

    /// `nats.servers`.
    pub fn nats(self, url: &str) -> Launch {
        self.setting("NATS__SERVERS", url)
    }

    /// `spool.dir`.
    pub fn spool(self, dir: &Path) -> Launch {
        self.setting("SPOOL__DIR", dir.to_str().expect("a UTF-8 path"))
    }

    /// A setting by its environment name without the prefix (`NATS__PUBLISH_TIMEOUT`).
    pub fn setting(self, key: &str, value: &str) -> Launch {
        self.env(&format!("CMC_FORWARDER__{key}"), value)
    }

    /// Settings as [`Launch::setting`] takes them.
    pub fn settings(self, pairs: &[(&str, &str)]) -> Launch {
        pairs.iter().fold(self, |l, (k, v)| l.setting(k, v))
    }

    /// Any environment variable, as is.
    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.command.env(key, value);
        self
    }

    /// Variables as [`Launch::env`] takes them.
    pub fn envs(self, pairs: &[(&str, &str)]) -> Launch {
        pairs.iter().fold(self, |l, (k, v)| l.env(k, v))
    }

    /// Removes a variable the launch set (e.g. `RUST_LOG`, so `log.level` decides).
    pub fn env_remove(mut self, key: &str) -> Launch {
        self.command.env_remove(key);
        self
    }

    /// An empty environment before the variables set after it.
    pub fn env_clear(mut self) -> Launch {
        self.command.env_clear();
        self
    }

    /// The process's working directory.
    pub fn current_dir(mut self, dir: &Path) -> Launch {
        self.command.current_dir(dir);
        self
    }

    /// Spawns the process, its stderr appended to the log.
    pub fn start(mut self) -> Service {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("cannot start the cmc-forwarder binary");
        Service {
            child,
            port: self.port,
            admin_port: self.admin_port,
            log: self.log,
        }
    }
}

impl Service {
    /// The usual process under test: [`Launch::service`] against `nats_url` with its spool in
    /// `spool_dir`.
    pub fn start(nats_url: &str, spool_dir: &Path, log: &Path) -> Service {
        Service::start_with(nats_url, spool_dir, log, &[])
    }

    /// [`Service::start`] with more settings, as [`Launch::settings`] takes them.
    pub fn start_with(
        nats_url: &str,
        spool_dir: &Path,
        log: &Path,
        settings: &[(&str, &str)],
    ) -> Service {
        Launch::service(log)
            .nats(nats_url)
            .spool(spool_dir)
            .settings(settings)
            .start()
    }

    /// The log's text so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn webhook_url(&self) -> String {
        format!("http://127.0.0.1:{}/webhooks/cmc", self.port)
    }

    pub fn readyz(&self) -> String {
        format!("http://127.0.0.1:{}/readyz", self.admin_port)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.admin_port)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until `/readyz` answers 200 (the process must not exit meanwhile).
    pub async fn wait_ready(&mut self, http: &reqwest::Client) {
        self.wait_ready_within(http, Duration::from_secs(15)).await
    }

    /// [`Service::wait_ready`], for at most `within`.
    pub async fn wait_ready_within(&mut self, http: &reqwest::Client, within: Duration) {
        let deadline = Instant::now() + within;
        while status_of(http, &self.readyz()).await != 200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the service exited ({status}) before ready:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the service never became ready:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
    }

    /// Waits for the process to exit; `None` after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then asserts exit status 0 within the grace period and a few seconds.
    pub async fn terminate(&mut self) -> Duration {
        let started = Instant::now();
        self.signal("-TERM");
        let status = self.wait_exit(GRACE + Duration::from_secs(4)).await;
        let status = status.unwrap_or_else(|| {
            panic!(
                "no exit within {:?} of SIGTERM:\n{}",
                GRACE + Duration::from_secs(4),
                self.log_tail()
            )
        });
        assert!(
            status.success(),
            "exit status {status} after SIGTERM:\n{}",
            self.log_tail()
        );
        started.elapsed()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a stream holds: how many messages, the distinct `Nats-Msg-Id`s, each event (by its
/// `messageId`) with how often it is stored, and each Inbound mail's message (by its
/// `subject`), once per time it is stored. The fault tests and the campaign check their
/// promises against it.
#[derive(Debug, Default)]
pub struct Stored {
    pub messages: usize,
    pub ids: HashSet<String>,
    pub keys: HashMap<String, usize>,
    pub mails: HashMap<String, Vec<StoredMail>>,
}

/// One stored Inbound mail message: its attachments as it names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMail {
    /// `(object, sha256, size)` of each attachment, in order.
    pub attachments: Vec<(String, String, u64)>,
}

/// Reads every message of `stream`; `None` when it cannot be read now. A sequence with no
/// message (deleted, or never written after a store was rolled back) is skipped.
pub async fn read_stream(js: &jetstream::Context, stream: &str) -> Option<Stored> {
    let stream = tokio::time::timeout(Duration::from_secs(5), js.get_stream(stream))
        .await
        .ok()?
        .ok()?;
    let state = stream.get_info().await.ok()?.state;
    let mut stored = Stored::default();
    if state.messages == 0 {
        return Some(stored);
    }
    let reads = futures_util::stream::iter(state.first_sequence..=state.last_sequence)
        .map(|seq| {
            let stream = &stream;
            async move {
                tokio::time::timeout(Duration::from_secs(5), stream.get_raw_message(seq)).await
            }
        })
        .buffered(64)
        .collect::<Vec<_>>()
        .await;
    for read in reads {
        let message = match read.ok()? {
            Ok(message) => message,
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                continue
            }
            Err(_) => return None,
        };
        stored.messages += 1;
        if let Some(id) = message.headers.get("Nats-Msg-Id") {
            stored.ids.insert(id.as_str().to_owned());
        }
        let body: serde_json::Value = serde_json::from_slice(&message.payload).ok()?;
        if body["event_type"] == "inbound" {
            let subject = body["subject"].as_str().unwrap_or_default().to_owned();
            let attachments = body["attachments"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .map(|a| {
                            (
                                a["object"].as_str().unwrap_or_default().to_owned(),
                                a["sha256"].as_str().unwrap_or_default().to_owned(),
                                a["size"].as_u64().unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            stored
                .mails
                .entry(subject)
                .or_default()
                .push(StoredMail { attachments });
            continue;
        }
        let key = body["messageId"].as_str().unwrap_or_default().to_owned();
        *stored.keys.entry(key).or_default() += 1;
    }
    Some(stored)
}
