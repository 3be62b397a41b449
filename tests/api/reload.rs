//! Configuration reload on SIGHUP, with the real binary started from a configuration file
//! (README "Reload the configuration" and "Rotate the CMC key"): the key rotation under
//! continuous load, an invalid file, a change that needs a restart, several Basic users, and
//! `log.level`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;

use crate::helpers::*;

/// The binary with its configuration file, which a test rewrites before each SIGHUP.
struct Reloading {
    service: Service,
    http: reqwest::Client,
    config: PathBuf,
    log: PathBuf,
    nats_url: String,
    _dir: tempfile::TempDir,
    _nats: NatsServer,
}

impl Reloading {
    /// Starts the service with `[auth]` set to `auth` and `[log] level` to `level`.
    async fn start(auth: &str, level: &str) -> Reloading {
        let nats = NatsServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let (config, log) = (
            dir.path().join("config.toml"),
            dir.path().join("service.log"),
        );
        let (port, admin_port) = (free_port(), free_port());
        let nats_url = nats.url();
        std::fs::write(&config, file(port, admin_port, &nats_url, auth, level)).unwrap();
        let mut service = Launch::config_file(&config, port, admin_port, &log).start();
        let http = http_client();
        service.wait_ready(&http).await;
        Reloading {
            service,
            http,
            config,
            log,
            nats_url,
            _dir: dir,
            _nats: nats,
        }
    }

    /// Rewrites the file with `[auth]` set to `auth` (same listeners), sends SIGHUP and waits
    /// until the reload has been counted with `result`.
    async fn reload(&self, auth: &str, level: &str, result: &str) {
        let text = file(
            self.service.port,
            self.service.admin_port,
            &self.nats_url,
            auth,
            level,
        );
        self.reload_file(&text, result).await;
    }

    /// Writes `text` as the configuration file, sends SIGHUP and waits until the reload has
    /// been counted with `result`.
    async fn reload_file(&self, text: &str, result: &str) {
        let before = self.reloads(result).await;
        write_atomically(&self.config, text);
        self.service.signal("-HUP");
        let deadline = Instant::now() + WAIT;
        while self.reloads(result).await == before {
            assert!(
                Instant::now() < deadline,
                "no reload counted as {result}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metrics(&self) -> String {
        get_text(
            &self.http,
            &format!("http://127.0.0.1:{}/metrics", self.service.admin_port),
        )
        .await
    }

    /// `cmc_forwarder_config_reloads_total{result}`.
    async fn reloads(&self, result: &str) -> u64 {
        series(
            &self.metrics().await,
            &format!("cmc_forwarder_config_reloads_total{{result=\"{result}\"}}"),
        )
    }

    async fn post(&self, key: &str) -> u16 {
        post(&self.http, &self.service.webhook_url(), key, None).await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A configuration file: listeners on `port` and `admin_port`, no spool, `[auth]` as given.
fn file(port: u16, admin_port: u16, nats_url: &str, auth: &str, level: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "2s"
[admin]
listen = "127.0.0.1:{admin_port}"
[nats]
servers = ["{nats_url}"]
publish_timeout = "2s"
connect_timeout = "2s"
[spool]
enabled = false
[log]
level = "{level}"
[auth]
{auth}
"#
    )
}

/// Replaces the file in one step (write, then rename), as an editor or a Kubernetes volume
/// update does, so a reload never reads half a file.
fn write_atomically(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// The value of one series of a `/metrics` page (0 when absent).
fn series(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Posts one delivery with `api_key` (and Basic `user:password`); the status, 0 when no answer
/// came.
async fn post(http: &reqwest::Client, url: &str, key: &str, basic: Option<(&str, &str)>) -> u16 {
    let body = serde_json::json!({
        "event_type": "deliveries",
        "server_composition": "pro",
        "api_key": key,
        "event": {"deliveries": [{"status": "queued"}]},
    });
    let mut request = http.post(url).json(&body);
    if let Some((user, password)) = basic {
        request = request.basic_auth(user, Some(password));
    }
    match request.send().await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

/// README "Rotate the CMC key", every step a SIGHUP, under continuous load: the senders
/// start with key A; the configuration goes [A] (unchanged), [A, B], then [B]; the senders
/// switch to B between the second and third reloads. Not one answer is other than 200, and
/// `/readyz` never stops answering 200; after the third reload A is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_under_load_refuses_no_request() {
    let app = Arc::new(Reloading::start(r#"api_key = "key-A""#, "info").await);
    let use_b = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<(bool, u16)>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let (app, use_b, stop, answers) =
            (app.clone(), use_b.clone(), stop.clone(), answers.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let b = use_b.load(Ordering::Relaxed);
                let status = app.post(if b { "key-B" } else { "key-A" }).await;
                answers.lock().unwrap().push((b, status));
            }
        }));
    }
    let not_ready: Arc<Mutex<Vec<u16>>> = Arc::default();
    let readiness = {
        let (app, stop, not_ready) = (app.clone(), stop.clone(), not_ready.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let status = status_of(&app.http, &app.service.readyz()).await;
                if status != 200 {
                    not_ready.lock().unwrap().push(status);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let pause = Duration::from_millis(400);
    let answered = || answers.lock().unwrap().len();

    tokio::time::sleep(pause).await;
    app.reload(r#"api_key = "key-A""#, "info", "ok").await;
    tokio::time::sleep(pause).await;
    app.reload(r#"api_key = ["key-A", "key-B"]"#, "info", "ok")
        .await;
    tokio::time::sleep(pause).await;
    let before_switch = answered();
    use_b.store(true, Ordering::Relaxed);
    tokio::time::sleep(pause).await;
    let metrics = app.metrics().await;
    // During the overlap, the requests with B are counted by B's position, 1.
    assert!(
        series(&metrics, r#"cmc_forwarder_api_key_requests_total{key="1"}"#) > 0,
        "{metrics}"
    );
    app.reload(r#"api_key = "key-B""#, "info", "ok").await;
    tokio::time::sleep(pause).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    readiness.await.unwrap();

    let answers = answers.lock().unwrap().clone();
    let with_a = answers.iter().filter(|(b, _)| !b).count();
    let with_b = answers.len() - with_a;
    let refused: Vec<&(bool, u16)> = answers.iter().filter(|(_, s)| *s != 200).collect();
    println!(
        "rotation under load: {} requests ({with_a} with A, {with_b} with B), {} not 200, 3 reloads",
        answers.len(),
        refused.len()
    );
    assert!(
        with_a >= 10 && with_b >= 10 && before_switch >= 10,
        "too little load to tell: {with_a} with A, {with_b} with B"
    );
    assert!(refused.is_empty(), "answers other than 200: {refused:?}");
    assert!(
        not_ready.lock().unwrap().is_empty(),
        "/readyz answered {:?} during the reloads",
        not_ready.lock().unwrap()
    );
    assert_eq!(
        app.post("key-A").await,
        401,
        "A is refused after the third reload"
    );
    assert_eq!(app.post("key-B").await, 200);
    assert_eq!(app.reloads("ok").await, 3);
    assert_eq!(app.reloads("error").await, 0);
    assert_eq!(app.reloads("restart_needed").await, 0);
    // Now B alone is position 0; the page never shows a key itself.
    let metrics = app.metrics().await;
    assert!(!metrics.contains("key-A") && !metrics.contains("key-B"));
    assert!(!app.log().contains("key-A") && !app.log().contains("key-B"));
}

/// An invalid file on SIGHUP changes nothing: the error log names the key, the `error`
/// counter is 1, and the running key stays the only one accepted.
#[tokio::test]
async fn an_invalid_file_on_sighup_keeps_the_running_configuration() {
    let app = Reloading::start(r#"api_key = "key-A""#, "info").await;
    // A new key, and an invalid limit: none of it may take effect.
    let invalid = file(
        app.service.port,
        app.service.admin_port,
        &app.nats_url,
        "api_key = \"key-B\"",
        "info",
    )
    .replace("[server]\n", "[server]\nmax_entries = \"many\"\n");
    app.reload_file(&invalid, "error").await;
    let log = app.log();
    let line = log
        .lines()
        .find(|l| l.contains("configuration not reloaded"))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(
        line.contains("ERROR") && line.contains("server.max_entries"),
        "{line}"
    );
    assert!(!log.contains("key-B"), "{log}");
    assert_eq!(app.reloads("error").await, 1);
    assert_eq!(app.reloads("ok").await, 0);
    assert_eq!(app.post("key-A").await, 200);
    assert_eq!(app.post("key-B").await, 401);
    assert_eq!(status_of(&app.http, &app.service.readyz()).await, 200);
    // A file that cannot be parsed at all is refused the same way.
    app.reload_file("[auth\n", "error").await;
    assert_eq!(app.reloads("error").await, 2);
    assert_eq!(app.post("key-A").await, 200);
}

/// `server.listen` cannot change without a restart: the change is logged by key, counted as
/// `restart_needed`, and the old listener goes on serving; the `[auth]` change in the same
/// file takes effect.
#[tokio::test]
async fn a_listen_change_is_logged_counted_and_not_applied() {
    let app = Reloading::start(r#"api_key = "key-A""#, "info").await;
    let elsewhere = free_port();
    let moved = file(
        elsewhere,
        app.service.admin_port,
        &app.nats_url,
        "api_key = \"key-B\"",
        "info",
    );
    app.reload_file(&moved, "restart_needed").await;
    let log = app.log();
    let line = log
        .lines()
        .find(|l| l.contains("need a restart"))
        .unwrap_or_else(|| panic!("no restart line:\n{log}"));
    assert!(
        line.contains("WARN") && line.contains("server.listen"),
        "{line}"
    );
    assert!(
        line.contains("auth"),
        "the live change is named too: {line}"
    );
    assert_eq!(app.reloads("restart_needed").await, 1);
    assert_eq!(app.reloads("ok").await, 0);
    // The old listener serves, under the new key; nothing listens on the new address.
    assert_eq!(app.post("key-B").await, 200);
    assert_eq!(app.post("key-A").await, 401);
    let url = format!("http://127.0.0.1:{elsewhere}/webhooks/cmc");
    assert_eq!(post(&app.http, &url, "key-B", None).await, 0);
    assert_eq!(status_of(&app.http, &app.service.readyz()).await, 200);
}

/// Two Basic users of `auth.basic_credentials` are both accepted and a third is refused; a
/// reload that adds the third lets it in.
#[tokio::test]
async fn two_basic_users_are_accepted_and_a_third_refused() {
    let users = r#"basic_credentials = [
  { username = "first", password = "pw-1" },
  { username = "second", password = "pw-2" },
]"#;
    let app = Reloading::start(users, "info").await;
    let url = app.service.webhook_url();
    let as_user = |user: &'static str, password: &'static str| {
        let (http, url) = (app.http.clone(), url.clone());
        async move { post(&http, &url, "", Some((user, password))).await }
    };
    assert_eq!(as_user("first", "pw-1").await, 200);
    assert_eq!(as_user("second", "pw-2").await, 200);
    assert_eq!(as_user("third", "pw-3").await, 401);
    assert_eq!(
        as_user("first", "pw-2").await,
        401,
        "a password is its user's"
    );
    assert_eq!(post(&app.http, &url, "", None).await, 401);
    let response = app
        .http
        .post(&url)
        .header(
            "authorization",
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("third:pw-3")
            ),
        )
        .json(&serde_json::json!({"event_type": "deliveries", "event": {"deliveries": []}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        "Basic realm=\"cmc-forwarder\""
    );

    let three = users.replace("]", "  { username = \"third\", password = \"pw-3\" },\n]");
    app.reload(&three, "info", "ok").await;
    assert_eq!(as_user("third", "pw-3").await, 200);
    assert_eq!(as_user("first", "pw-1").await, 200);
}

/// `log.level` changes live: at `warn` an accepted batch is not logged; after a reload to
/// `info`, it is.
#[tokio::test]
async fn the_log_level_changes_on_sighup() {
    let app = Reloading::start("", "warn").await;
    assert_eq!(app.post("").await, 200);
    app.reload("", "info", "ok").await;
    assert_eq!(app.post("").await, 200);
    let log = app.log();
    let accepted = log.lines().filter(|l| l.contains("batch accepted")).count();
    assert_eq!(accepted, 1, "{log}");
}

/// A request admitted before a reload finishes under the settings it started with: its body
/// still arriving when the key is replaced, its old key is accepted; the next request with it
/// is refused.
#[tokio::test]
async fn a_request_in_flight_finishes_under_the_settings_it_started_with() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = Reloading::start(r#"api_key = "key-A""#, "info").await;
    let body = serde_json::json!({
        "event_type": "deliveries",
        "server_composition": "pro",
        "api_key": "key-A",
        "event": {"deliveries": [{"status": "queued"}]},
    })
    .to_string();
    let (first, rest) = body.split_at(body.len() / 2);
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", app.service.port))
        .await
        .unwrap();
    let head = format!(
        "POST /webhooks/cmc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.reload(r#"api_key = "key-B""#, "info", "ok").await;
    stream.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(app.post("key-A").await, 401);
    assert_eq!(app.post("key-B").await, 200);
}

/// `check-config` tells how many API keys and Basic users are accepted, never what they are.
#[tokio::test]
async fn check_config_counts_keys_and_users() {
    let output = forwarder_command()
        .arg("check-config")
        .env_clear()
        .env("CMC_FORWARDER__AUTH__API_KEY__0", "secret-key-0")
        .env("CMC_FORWARDER__AUTH__API_KEY__1", "secret-key-1")
        .env("CMC_FORWARDER__AUTH__BASIC_CREDENTIALS__0__USERNAME", "cmc")
        .env(
            "CMC_FORWARDER__AUTH__BASIC_CREDENTIALS__0__PASSWORD",
            "secret-pw",
        )
        .output()
        .unwrap();
    let (printed, said) = (
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    );
    assert!(output.status.success(), "{said}");
    assert!(
        said.contains("configuration is valid (2 API keys accepted, 1 HTTP Basic user accepted)"),
        "{said}"
    );
    assert!(
        printed.contains(r#"api_key = ["[redacted]", "[redacted]"]"#),
        "{printed}"
    );
    for secret in ["secret-key-0", "secret-key-1", "secret-pw"] {
        assert!(
            !printed.contains(secret) && !said.contains(secret),
            "{secret} shown"
        );
    }
}
