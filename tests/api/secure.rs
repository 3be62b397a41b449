//! Every NATS security option against a real secured `nats-server`: TLS with a private CA,
//! mutual TLS, token, user/password, nkey, an operator-mode creds file, a JetStream domain
//! behind a leaf node, and the failures an operator meets (wrong password, expired or revoked
//! user JWT, untrusted CA, missing client certificate, a subject the user may not publish to).
//!
//! The forwarder runs as the real binary with a TOML file, so each option is proven in the
//! form an operator writes it, and its log and `/readyz` are what an operator would see.
//! Certificates, keys and JWTs are generated here, per test; nothing secret is committed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::{
    fixture, forwarder_command, free_port, get_text, nats_server_bin, Enc, Launch, Service, WAIT,
};

const STREAM: &str = "CMC_EVENTS";

/// A `nats-server` run from a configuration file (which may be rewritten and reloaded).
struct SecureNats {
    child: Child,
    port: u16,
    conf: PathBuf,
    log: PathBuf,
}

impl SecureNats {
    /// Starts a server with `conf` (the port, the store and the log are added here).
    async fn start(dir: &Path, name: &str, conf: &str) -> SecureNats {
        let port = free_port();
        let conf_path = dir.join(format!("{name}.conf"));
        let log = dir.join(format!("{name}.log"));
        let store = dir.join(format!("{name}-store"));
        std::fs::write(
            &conf_path,
            format!(
                "host: 127.0.0.1\nport: {port}\nlog_file: {log:?}\n{}",
                conf.replace("STORE_DIR", &format!("{store:?}"))
            ),
        )
        .unwrap();
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start nats-server (set NATS_SERVER_BIN)");
        let server = SecureNats {
            child,
            port,
            conf: conf_path,
            log,
        };
        let deadline = Instant::now() + WAIT;
        while !server.log().contains("Server is ready") {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replaces `from` by `to` in the configuration and makes the server reload it.
    fn reconfigure(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.conf).unwrap();
        assert!(text.contains(from), "{from} not in the configuration");
        std::fs::write(&self.conf, text.replace(from, to)).unwrap();
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for SecureNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real `cmc-forwarder` binary with a TOML file ([`Launch::config_file`]), on fresh
/// loopback ports.
struct Forwarder {
    service: Service,
    http: reqwest::Client,
}

impl Forwarder {
    /// Starts the binary with `[nats]` settings `nats_toml` (plus `extra` TOML sections).
    fn start(dir: &Path, nats_toml: &str, extra: &str) -> Forwarder {
        Forwarder::start_with_env(dir, nats_toml, extra, &[])
    }

    fn start_with_env(dir: &Path, nats_toml: &str, extra: &str, env: &[(&str, &str)]) -> Forwarder {
        let (port, admin_port) = (free_port(), free_port());
        let conf = dir.join("forwarder.toml");
        std::fs::write(
            &conf,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
                 [nats]\npublish_timeout = \"2s\"\nconnect_timeout = \"2s\"\n{nats_toml}\n\
                 [nats.stream]\nstorage = \"memory\"\n{}\n",
                // Without a spool unless the test asks for one, so failures answer 503.
                if extra.contains("[spool]") { extra.to_owned() } else { format!("[spool]\nenabled = false\n{extra}") }
            ),
        )
        .unwrap();
        let log = dir.join("forwarder.log");
        // A fresh log: a second forwarder in the same directory must not read the first's.
        let _ = std::fs::remove_file(&log);
        let service = Launch::config_file(&conf, port, admin_port, &log)
            .env_clear()
            .envs(env)
            .env("RUST_LOG", "info")
            .current_dir(dir)
            .start();
        Forwarder {
            service,
            http: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        }
    }

    fn log(&self) -> String {
        self.service.log()
    }

    /// Panics when the process has exited: a failure must never become a crash loop.
    fn assert_alive(&mut self) {
        if let Some(status) = self.service.child.try_wait().unwrap() {
            panic!("the forwarder exited ({status}):\n{}", self.log());
        }
    }

    async fn readyz(&self) -> Option<(u16, Value)> {
        let url = format!("http://127.0.0.1:{}/readyz", self.service.admin_port);
        let response = self.http.get(url).send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Waits until `/readyz` answers `status` (and, for 503, a reason containing `reason`).
    async fn wait_readyz(&mut self, status: u16, reason: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.assert_alive();
            if let Some((got, body)) = self.readyz().await {
                let text = body["reason"].as_str().unwrap_or_default();
                if got == status && text.contains(reason) {
                    return body;
                }
                assert!(
                    Instant::now() < deadline,
                    "readyz stayed {got} {body} (wanted {status} {reason:?}):\n{}",
                    self.log()
                );
            } else {
                assert!(Instant::now() < deadline, "no readyz:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_ready(&mut self) {
        self.wait_readyz(200, "").await;
    }

    /// Waits until the log contains `text`.
    async fn wait_log(&mut self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.assert_alive();
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "the log never said {text:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn post(&self, name: &str, query: &str, basic: Option<(&str, &str)>) -> (u16, Value) {
        let body = String::from_utf8(fixture(name, Enc::Form)).unwrap() + query;
        let mut request = self
            .http
            .post(format!(
                "http://127.0.0.1:{}/webhooks/cmc",
                self.service.port
            ))
            .header("content-type", Enc::Form.content_type())
            .body(body);
        if let Some((user, password)) = basic {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.service.admin_port);
        get_text(&self.http, &url).await
    }
}

/// Messages stored in the stream, read by an observer connected with `options`.
async fn stored(js: &jetstream::Context) -> u64 {
    match js.get_stream(STREAM).await {
        Ok(mut stream) => stream.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Posts the queued-delivery fixture and checks that its event reaches the stream.
async fn assert_forwards(forwarder: &Forwarder, js: &jetstream::Context) {
    assert_forwards_fixture(forwarder, js, "deliveries-queued").await;
}

/// Posts a one-entry fixture and checks that its event reaches the stream.
async fn assert_forwards_fixture(forwarder: &Forwarder, js: &jetstream::Context, name: &str) {
    let before = stored(js).await;
    let (status, body) = forwarder.post(name, "", None).await;
    assert_eq!(status, 200, "{body}\n{}", forwarder.log());
    assert_eq!(body["published"], 1, "{body}");
    assert_eq!(stored(js).await, before + 1);
}

async fn observer(options: async_nats::ConnectOptions, url: &str) -> async_nats::Client {
    options
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("observer cannot connect to {url}: {e}"))
}

/// A private CA and certificates it signs, written as PEM files.
struct Pki {
    dir: PathBuf,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let pki = Pki {
            dir: dir.to_owned(),
            issuer,
        };
        std::fs::write(pki.path(&format!("{name}-ca.pem")), pki.issuer.pem()).unwrap();
        pki
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Writes `<name>.pem` and `<name>-key.pem` for `names`, for a server or a client.
    fn issue(&self, name: &str, names: &[&str], client: bool) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name.to_owned());
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}-key.pem")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

#[tokio::test]
async fn tls_with_a_private_ca_verifies_the_host_name() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "private");
    let (cert, key) = pki.issue("server", &["localhost"], false);
    let nats = SecureNats::start(
        dir.path(),
        "nats",
        &format!(
            "jetstream {{ store_dir: STORE_DIR }}\ntls {{ cert_file: {:?}, key_file: {:?} }}\n",
            cert, key
        ),
    )
    .await;
    let ca = pki.path("private-ca.pem");
    let url = format!("tls://localhost:{}", nats.port);
    let mut forwarder = Forwarder::start(
        dir.path(),
        &format!("servers = [\"{url}\"]\ntls_ca_file = {}", toml_path(&ca)),
        "",
    );
    forwarder.wait_ready().await;
    let client = observer(
        async_nats::ConnectOptions::new()
            .add_root_certificates(ca.clone())
            .require_tls(true),
        &url,
    )
    .await;
    assert_forwards(&forwarder, &jetstream::new(client)).await;

    // The same certificate reached under a name it does not carry is refused, by name.
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let other = tempfile::tempdir().unwrap();
    let mut wrong_name = Forwarder::start(
        other.path(),
        &format!("servers = [\"{url}\"]\ntls_ca_file = {}", toml_path(&ca)),
        "",
    );
    let body = wrong_name
        .wait_readyz(503, "not valid for the host name")
        .await;
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("not valid for name"),
        "{body}"
    );
}

/// A private CA with a server certificate for `localhost` and a client certificate, and a
/// nats-server that requires and verifies a client certificate signed by that CA.
struct MutualTls {
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    url: String,
    _nats: SecureNats,
}

impl MutualTls {
    async fn start(dir: &Path) -> MutualTls {
        let pki = Pki::new(dir, "private");
        let (cert, key) = pki.issue("server", &["localhost"], false);
        let (client_cert, client_key) = pki.issue("forwarder", &["forwarder"], true);
        let ca = pki.path("private-ca.pem");
        let nats = SecureNats::start(
            dir,
            "nats",
            &format!(
                "jetstream {{ store_dir: STORE_DIR }}\n\
                 tls {{ cert_file: {cert:?}, key_file: {key:?}, ca_file: {ca:?}, verify: true }}\n"
            ),
        )
        .await;
        MutualTls {
            ca,
            client_cert,
            client_key,
            url: format!("tls://localhost:{}", nats.port),
            _nats: nats,
        }
    }

    /// The forwarder's `[nats]` settings: the client certificate, trusting `ca`.
    fn nats_toml(&self, ca: &Path) -> String {
        format!(
            "servers = [\"{}\"]\ntls_ca_file = {}\ntls_cert_file = {}\ntls_key_file = {}",
            self.url,
            toml_path(ca),
            toml_path(&self.client_cert),
            toml_path(&self.client_key)
        )
    }

    /// A JetStream reader with the client certificate.
    async fn reader(&self) -> jetstream::Context {
        let client = observer(
            async_nats::ConnectOptions::new()
                .add_root_certificates(self.ca.clone())
                .add_client_certificate(self.client_cert.clone(), self.client_key.clone())
                .require_tls(true),
            &self.url,
        )
        .await;
        jetstream::new(client)
    }
}

#[tokio::test]
async fn mutual_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let tls = MutualTls::start(dir.path()).await;
    let mut forwarder = Forwarder::start(dir.path(), &tls.nats_toml(&tls.ca), "");
    forwarder.wait_ready().await;
    assert_forwards(&forwarder, &tls.reader().await).await;
}

#[tokio::test]
async fn untrusted_ca_and_missing_client_certificate_are_named_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let tls = MutualTls::start(dir.path()).await;
    let stranger = Pki::new(dir.path(), "stranger");

    // An untrusted CA: the log and readyz name it.
    let untrusted = tempfile::tempdir().unwrap();
    let mut forwarder = Forwarder::start(
        untrusted.path(),
        &tls.nats_toml(&stranger.path("stranger-ca.pem")),
        "",
    );
    forwarder
        .wait_readyz(503, "not signed by nats.tls_ca_file")
        .await;
    let log = forwarder.wait_log("UnknownIssuer").await;
    assert!(log.contains("cannot connect to NATS"), "{log}");
    // No crash loop: still running, still answering, refusing honestly.
    tokio::time::sleep(Duration::from_secs(1)).await;
    forwarder.assert_alive();
    let (status, body) = forwarder.post("deliveries-queued", "", None).await;
    assert_eq!(status, 503, "{body}");
    // Fixed in place (the CA file now holds the right CA): recovers without a restart.
    std::fs::copy(&tls.ca, stranger.path("stranger-ca.pem")).unwrap();
    forwarder.wait_ready().await;
    assert_forwards(&forwarder, &tls.reader().await).await;
    drop(forwarder);

    // A missing client certificate: named too.
    let missing = tempfile::tempdir().unwrap();
    let mut forwarder = Forwarder::start(
        missing.path(),
        &format!(
            "servers = [\"{}\"]\ntls_ca_file = {}",
            tls.url,
            toml_path(&tls.ca)
        ),
        "",
    );
    forwarder
        .wait_readyz(503, "the server requires a client certificate")
        .await;
    forwarder.wait_log("CertificateRequired").await;
    forwarder.assert_alive();
}

#[tokio::test]
async fn token_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let nats = SecureNats::start(
        dir.path(),
        "nats",
        "jetstream { store_dir: STORE_DIR }\nauthorization { token: \"t0k3n-s3cret\" }\n",
    )
    .await;
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let mut forwarder = Forwarder::start(
        dir.path(),
        &format!("servers = [\"{url}\"]\ntoken = \"t0k3n-s3cret\""),
        "",
    );
    forwarder.wait_ready().await;
    let client = observer(
        async_nats::ConnectOptions::with_token("t0k3n-s3cret".into()),
        &url,
    )
    .await;
    assert_forwards(&forwarder, &jetstream::new(client)).await;
    assert!(!forwarder.log().contains("t0k3n-s3cret"));
}

#[tokio::test]
async fn user_and_password_authentication_and_a_wrong_password_recovering() {
    let dir = tempfile::tempdir().unwrap();
    let nats = SecureNats::start(
        dir.path(),
        "nats",
        "jetstream { store_dir: STORE_DIR }\n\
         authorization { users = [ { user: fwd, password: \"old-pass-1\" }, { user: obs, password: obs } ] }\n",
    )
    .await;
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let mut forwarder = Forwarder::start(
        dir.path(),
        &format!("servers = [\"{url}\"]\nusername = \"fwd\"\npassword = \"new-pass-2\""),
        "",
    );
    // The wrong password: logged with its cause, readyz 503 with the reason, no crash loop.
    forwarder.wait_readyz(503, "authorization violation").await;
    let log = forwarder.wait_log("authorization violation").await;
    assert!(
        !log.contains("new-pass-2") && !log.contains("old-pass-1"),
        "{log}"
    );
    let (status, body) = forwarder.post("deliveries-queued", "", None).await;
    assert_eq!(status, 503, "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    forwarder.assert_alive();

    // The server now accepts the forwarder's password: it recovers without a restart.
    nats.reconfigure("old-pass-1", "new-pass-2");
    forwarder.wait_ready().await;
    let client = observer(
        async_nats::ConnectOptions::with_user_and_password("obs".into(), "obs".into()),
        &url,
    )
    .await;
    assert_forwards(&forwarder, &jetstream::new(client)).await;
}

#[tokio::test]
async fn nkey_seed_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let nats = SecureNats::start(
        dir.path(),
        "nats",
        &format!(
            "jetstream {{ store_dir: STORE_DIR }}\nauthorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    )
    .await;
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let seed = user.seed().unwrap();
    let mut forwarder = Forwarder::start(
        dir.path(),
        &format!("servers = [\"{url}\"]\nnkey_seed = \"{seed}\""),
        "",
    );
    forwarder.wait_ready().await;
    let client = observer(async_nats::ConnectOptions::with_nkey(seed.clone()), &url).await;
    assert_forwards(&forwarder, &jetstream::new(client)).await;
    assert!(!forwarder.log().contains(&seed));
}

/// Operator → account → user JWTs, signed with nkeys as `nsc` would.
struct Operator {
    operator: nkeys::KeyPair,
    account: nkeys::KeyPair,
    /// The system account JetStream needs in operator mode.
    system: nkeys::KeyPair,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn jwt(
    issuer: &nkeys::KeyPair,
    subject: &str,
    name: &str,
    nats: Value,
    exp: Option<i64>,
) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let mut claims = json!({
        "jti": format!("{:032X}", rand_u128()),
        "iat": now() - 60,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    if let Some(exp) = exp {
        claims["exp"] = json!(exp);
    }
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{body}");
    let signature = URL_SAFE_NO_PAD.encode(issuer.sign(signed.as_bytes()).unwrap());
    format!("{signed}.{signature}")
}

fn rand_u128() -> u128 {
    let bytes = uuid::Uuid::new_v4();
    bytes.as_u128()
}

impl Operator {
    fn new() -> Operator {
        Operator {
            operator: nkeys::KeyPair::new_operator(),
            account: nkeys::KeyPair::new_account(),
            system: nkeys::KeyPair::new_account(),
        }
    }

    /// The server's configuration: the operator, and the account preloaded in memory, with
    /// `revoked` users.
    fn server_conf(&self, revoked: &[&str]) -> String {
        let operator_jwt = jwt(
            &self.operator,
            &self.operator.public_key(),
            "test-operator",
            json!({"type": "operator", "version": 2, "system_account": self.system.public_key()}),
            None,
        );
        let system_jwt = jwt(
            &self.operator,
            &self.system.public_key(),
            "SYS",
            json!({"type": "account", "version": 2, "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1}}),
            None,
        );
        let revocations: serde_json::Map<String, Value> = revoked
            .iter()
            .map(|u| (u.to_string(), json!(now())))
            .collect();
        let account_jwt = jwt(
            &self.operator,
            &self.account.public_key(),
            "test-account",
            json!({
                "type": "account", "version": 2,
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
                },
                "revocations": revocations,
            }),
            None,
        );
        format!(
            "jetstream {{ store_dir: STORE_DIR }}\noperator: {operator_jwt}\nresolver: MEMORY\n\
             system_account: {system}\n\
             resolver_preload: {{ {}: {account_jwt}, {system}: {system_jwt} }}\n",
            self.account.public_key(),
            system = self.system.public_key(),
        )
    }

    /// A creds file for `user`, expiring at `exp`.
    fn creds(&self, user: &nkeys::KeyPair, exp: Option<i64>) -> String {
        let user_jwt = jwt(
            &self.account,
            &user.public_key(),
            "forwarder",
            json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
            exp,
        );
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        )
    }
}

#[tokio::test]
async fn creds_file_against_an_operator_mode_server() {
    let dir = tempfile::tempdir().unwrap();
    let operator = Operator::new();
    let nats = SecureNats::start(dir.path(), "nats", &operator.server_conf(&[])).await;
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let creds = dir.path().join("forwarder.creds");
    std::fs::write(&creds, operator.creds(&nkeys::KeyPair::new_user(), None)).unwrap();
    let mut forwarder = Forwarder::start(
        dir.path(),
        &format!("servers = [\"{url}\"]\ncreds_file = {}", toml_path(&creds)),
        "",
    );
    forwarder.wait_ready().await;
    let observer_creds = dir.path().join("observer.creds");
    std::fs::write(
        &observer_creds,
        operator.creds(&nkeys::KeyPair::new_user(), None),
    )
    .unwrap();
    let client = observer(
        async_nats::ConnectOptions::with_credentials_file(observer_creds)
            .await
            .unwrap(),
        &url,
    )
    .await;
    assert_forwards(&forwarder, &jetstream::new(client)).await;
}

#[tokio::test]
async fn expired_and_revoked_user_jwts_are_reported_and_recover_when_the_creds_file_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let operator = Operator::new();
    let revoked = nkeys::KeyPair::new_user();
    let nats = SecureNats::start(
        dir.path(),
        "nats",
        &operator.server_conf(&[&revoked.public_key()]),
    )
    .await;
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let observer_creds = dir.path().join("observer.creds");
    std::fs::write(
        &observer_creds,
        operator.creds(&nkeys::KeyPair::new_user(), None),
    )
    .unwrap();
    let js = jetstream::new(
        observer(
            async_nats::ConnectOptions::with_credentials_file(observer_creds)
                .await
                .unwrap(),
            &url,
        )
        .await,
    );

    for (case, creds_text, fixture) in [
        (
            "expired",
            operator.creds(&nkeys::KeyPair::new_user(), Some(now() - 3600)),
            "deliveries-queued",
        ),
        (
            "revoked",
            operator.creds(&revoked, None),
            "deliveries-succeeded",
        ),
    ] {
        let case_dir = tempfile::tempdir().unwrap();
        let creds = case_dir.path().join("forwarder.creds");
        std::fs::write(&creds, &creds_text).unwrap();
        let mut forwarder = Forwarder::start(
            case_dir.path(),
            &format!("servers = [\"{url}\"]\ncreds_file = {}", toml_path(&creds)),
            "",
        );
        let expected = match case {
            "expired" => "authorization violation: the user JWT in nats.creds_file",
            _ => "authorization violation: the server refused the credentials",
        };
        forwarder.wait_readyz(503, expected).await;
        let log = forwarder.wait_log(expected).await;
        let seed_line = creds_text
            .lines()
            .find(|l| l.starts_with("SU"))
            .unwrap()
            .to_owned();
        assert!(!log.contains(&seed_line), "{case}: the seed was logged");
        tokio::time::sleep(Duration::from_secs(1)).await;
        forwarder.assert_alive();
        // A valid creds file in place of the bad one: picked up at the next attempt.
        std::fs::write(&creds, operator.creds(&nkeys::KeyPair::new_user(), None)).unwrap();
        forwarder.wait_ready().await;
        assert_forwards_fixture(&forwarder, &js, fixture).await;
    }
}

#[tokio::test]
async fn jetstream_domain_through_a_leaf_node() {
    let dir = tempfile::tempdir().unwrap();
    let leaf_port = free_port();
    let hub = SecureNats::start(
        dir.path(),
        "hub",
        &format!(
            "server_name: hub\njetstream {{ store_dir: STORE_DIR, domain: hub }}\n\
             leafnodes {{ host: 127.0.0.1, port: {leaf_port} }}\n"
        ),
    )
    .await;
    let leaf = SecureNats::start(
        dir.path(),
        "leaf",
        &format!(
            "server_name: leaf\nleafnodes {{ remotes = [ {{ url: \"nats-leaf://127.0.0.1:{leaf_port}\" }} ] }}\n"
        ),
    )
    .await;
    // Wait for the leaf connection before the forwarder starts.
    let deadline = Instant::now() + WAIT;
    while !leaf.log().contains("Leafnode connection created") {
        assert!(
            Instant::now() < deadline,
            "leaf not connected:\n{}",
            leaf.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut forwarder = Forwarder::start(
        dir.path(),
        &format!(
            "servers = [\"nats://127.0.0.1:{}\"]\njetstream_domain = \"hub\"",
            leaf.port
        ),
        "",
    );
    forwarder.wait_ready().await;
    // The stream lives in the hub; read it there.
    let hub_js = jetstream::new(
        async_nats::connect(format!("nats://127.0.0.1:{}", hub.port))
            .await
            .unwrap(),
    );
    assert_forwards(&forwarder, &hub_js).await;
    assert!(!leaf.log().contains("JetStream started"));
}

#[tokio::test]
async fn permission_denied_on_one_subject_is_503_and_not_spooled() {
    permission_denied_on_one_subject("jetstream").await;
}

/// Core NATS acknowledges nothing and async-nats's flush ends when the socket has taken the
/// bytes: the server's denial arrives after the `200` (what `200` means in core mode). It is
/// still logged and counted, and the denied event never reaches the bus.
#[tokio::test]
async fn in_core_mode_a_denied_publish_is_logged_and_counted_after_its_200() {
    permission_denied_on_one_subject("core").await;
}

/// A user allowed `cmc.>` but denied `cmc.bounces.>`, in `nats.mode` `mode`. In `jetstream`
/// mode a batch for the denied subject is `503` on the server's refusal (not after the publish
/// timeout) and never spooled; in `core` mode it is `200`. Either way the denial is logged and
/// counted, and the next allowed batch goes straight out and is the first event on the bus.
async fn permission_denied_on_one_subject(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let nats = SecureNats::start(
        dir.path(),
        "nats",
        "jetstream { store_dir: STORE_DIR }\n\
         authorization { users = [\n\
           { user: fwd, password: pw, permissions: {\n\
               publish: { allow: [\"cmc.>\", \"$JS.API.>\"], deny: [\"cmc.bounces.>\"] },\n\
               subscribe: { allow: [\"_INBOX.>\"] } } },\n\
           { user: obs, password: obs } ] }\n",
    )
    .await;
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let watcher = observer(
        async_nats::ConnectOptions::with_user_and_password("obs".into(), "obs".into()),
        &url,
    )
    .await;
    let mut on_the_bus = watcher.subscribe("cmc.>").await.unwrap();
    watcher.flush().await.unwrap();
    let mut forwarder = Forwarder::start(
        dir.path(),
        &format!("servers = [\"{url}\"]\nusername = \"fwd\"\npassword = \"pw\"\nmode = \"{mode}\""),
        "[spool]\nenabled = true\ndir = \"spool\"\n",
    );
    forwarder.wait_ready().await;

    let started = Instant::now();
    let (status, body) = forwarder.post("bounces-user-unknown", "", None).await;
    if mode == "core" {
        assert_eq!(status, 200, "{body}");
    } else {
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"], "unavailable", "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("permission denied"),
            "{body}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(body.get("spooled").is_none(), "{body}");
    forwarder.wait_log("NATS denied publishing").await;
    let metrics = forwarder.metrics().await;
    assert!(
        metrics.contains("cmc_forwarder_nats_publish_denied_total 1"),
        "{metrics}"
    );
    // Nothing waits in the spool: the next allowed batch is published directly.
    let (status, body) = forwarder.post("deliveries-succeeded", "", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["published"], 1, "{body}");
    assert!(body.get("spooled").is_none(), "{body}");
    let message = tokio::time::timeout(WAIT, on_the_bus.next())
        .await
        .expect("the allowed event reaches the bus")
        .unwrap();
    assert_eq!(message.subject.as_str(), "cmc.deliveries.succeeded");
    if mode == "jetstream" {
        assert_eq!(stored(&jetstream::new(watcher)).await, 1);
    }
}

#[tokio::test]
async fn environment_secrets_stay_byte_exact() {
    for value in ["007123", "1.50", "true", "12345678901234567890"] {
        let dir = tempfile::tempdir().unwrap();
        let nats = SecureNats::start(
            dir.path(),
            "nats",
            &format!(
                "jetstream {{ store_dir: STORE_DIR }}\n\
                 authorization {{ users = [ {{ user: fwd, password: \"{value}\" }} ] }}\n"
            ),
        )
        .await;
        let url = format!("nats://127.0.0.1:{}", nats.port);
        let mut forwarder = Forwarder::start_with_env(
            dir.path(),
            "",
            "",
            &[
                ("NATS_URL", url.as_str()),
                ("CMC_FORWARDER__AUTH__API_KEY", value),
                ("CMC_FORWARDER__AUTH__BASIC_USERNAME", "cmc"),
                ("CMC_FORWARDER__AUTH__BASIC_PASSWORD", value),
                ("CMC_FORWARDER__NATS__USERNAME", "fwd"),
                ("CMC_FORWARDER__NATS__PASSWORD", value),
            ],
        );
        // The NATS password case: it connects.
        forwarder.wait_ready().await;
        let (status, body) = forwarder
            .post(
                "deliveries-queued",
                &format!("&api_key={value}"),
                Some(("cmc", value)),
            )
            .await;
        assert_eq!(status, 200, "{value}: {body}");
        // What the old number parsing made of it is refused.
        let mangled = value.trim_start_matches('0').trim_end_matches('0');
        if mangled != value {
            let (status, _) = forwarder
                .post(
                    "deliveries-queued",
                    &format!("&api_key={mangled}"),
                    Some(("cmc", value)),
                )
                .await;
            assert_eq!(status, 401, "{value}: {mangled} accepted");
        }
    }
}

#[tokio::test]
async fn check_config_output_round_trips() {
    use cmc_forwarder::settings::Settings;
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original.toml");
    std::fs::write(
        &original,
        "[server]\nlisten = \"127.0.0.1:9000\"\nrequest_timeout = \"1m 30s\"\n\
         [auth]\napi_key = \"007123\"\nallowed_ips = [\"10.0.0.0/8\", \"192.0.2.7\"]\n\
         [nats]\nservers = [\"tls://a:4222\", \"tls://b:4222\"]\ntoken = \"t-1.50\"\n\
         jetstream_domain = \"hub\"\nsubject = \"cmc.{event_type}.{status_name}\"\n\
         [cmc]\ntimezone = \"+09:00\"\n",
    )
    .unwrap();
    let check = |path: &Path, env: &[(&str, &str)]| {
        forwarder_command()
            .env_clear()
            .envs(env.iter().copied())
            .arg("check-config")
            .arg("--config")
            .arg(path)
            .output()
            .unwrap()
    };
    let output = check(&original, &[]);
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(
        !printed.contains("007123") && !printed.contains("t-1.50"),
        "{printed}"
    );
    let printed_path = dir.path().join("printed.toml");
    std::fs::write(&printed_path, &printed).unwrap();

    // Fed back as is: refused, naming the secret and why.
    let output = check(&printed_path, &[]);
    assert!(!output.status.success());
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(
        error.contains("auth.api_key") && error.contains("placeholder"),
        "{error}"
    );

    // With the secrets supplied again, the same configuration.
    let secrets = [
        ("CMC_FORWARDER__AUTH__API_KEY", "007123"),
        ("CMC_FORWARDER__NATS__TOKEN", "t-1.50"),
    ];
    let output = check(&printed_path, &secrets);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8(output.stdout).unwrap(), printed);
    let env = |pairs: &[(&str, &str)]| {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    };
    let again = Settings::load(Some(&printed_path), env(&secrets)).unwrap();
    let first = Settings::load(Some(&original), env(&[])).unwrap();
    assert_eq!(again, first);
    assert_eq!(again.auth.api_key.keys()[0].expose(), "007123");
}
