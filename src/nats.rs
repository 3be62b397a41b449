//! The NATS connection and the JetStream stream: connection options from `[nats]`
//! (credentials, TLS, JetStream domain), the stream set-up, and the watch over the
//! connection's health that `/readyz`, the logs and the publisher read.
//!
//! The client reports a failed connection attempt by its kind only ("IO error", "TLS
//! error"), which does not tell an operator that a certificate is the problem. When TLS is
//! configured, such a failure is followed by a handshake of our own with the same CA and
//! client certificate, whose error names the cause (unknown issuer, wrong host name, missing
//! client certificate). Credentials files are read again at every connection, so a fixed
//! file is picked up without a restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::context::CreateStreamErrorKind;
use async_nats::jetstream::{self, stream, ErrorCode};
use async_nats::{AuthError, Client, ConnectOptions, Event, ServerError};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio_rustls::rustls;

use crate::metrics;
use crate::settings::{Mode, NatsSettings, Storage};
use crate::subject::SubjectTemplate;

/// Why the connection or the stream could not be set up.
#[derive(Debug, Error)]
pub enum SetupError {
    #[error("cannot read NATS credentials: {0}")]
    Credentials(String),
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    #[error("stream {name}: {message}")]
    Stream { name: String, message: String },
    /// JetStream gave no answer to the stream's set-up (a cluster without a meta leader yet,
    /// regaining its quorum after a restart): a state that passes, unlike a refusal, so
    /// start-up goes on and sets the stream up in the background.
    #[error("stream {name}: {message}")]
    StreamUnanswered { name: String, message: String },
}

/// How many recent publish denials are remembered.
const DENIALS_KEPT: usize = 64;

/// What the connection's events have told about its health.
#[derive(Debug, Default)]
pub struct Health {
    /// Why the last connection attempt failed; cleared once connected.
    last_error: Mutex<Option<String>>,
    /// Subjects the server refused to let us publish to, each with its mark (the count of
    /// denials up to and including it).
    denied: Mutex<Vec<(String, u64)>>,
    /// How many denials were recorded in all.
    denials: AtomicU64,
    /// Ticks whenever a denial is recorded, to wake publishers waiting for acks.
    denied_tick: tokio::sync::Notify,
    /// Ticks whenever the connection is (re-)established.
    connected: tokio::sync::Notify,
    /// Set while a TLS diagnosis runs, so a reconnect loop starts at most one at a time.
    diagnosing: AtomicBool,
    /// What is known to be wrong with the credentials sent at the last attempt (an expired
    /// user JWT), to name the cause of the server's bare "authorization violation".
    credentials_problem: Mutex<Option<String>>,
}

impl Health {
    /// Resolves at the next (re-)connection.
    pub async fn reconnected(&self) {
        self.connected.notified().await
    }

    /// Why connecting fails, when it does.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Records why connecting fails; logs it when it differs from the previous reason, so a
    /// reconnect loop logs a cause once rather than every second.
    fn set_error(&self, reason: String) {
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref() != Some(reason.as_str()) {
            tracing::error!(reason = %reason, "cannot connect to NATS; retrying");
        }
        *last = Some(reason);
    }

    fn clear_error(&self) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = None;
        }
    }

    fn set_credentials_problem(&self, problem: Option<String>) {
        if let Ok(mut slot) = self.credentials_problem.lock() {
            *slot = problem;
        }
    }

    /// Why the server refused the credentials, as far as the client can tell.
    fn authorization_violation(&self) -> String {
        let known = self.credentials_problem.lock().ok().and_then(|p| p.clone());
        match known {
            Some(problem) => format!("authorization violation: {problem}"),
            None => "authorization violation: the server refused the credentials (wrong or \
                     missing user, password, token, nkey or creds, or a revoked or expired user JWT)"
                .into(),
        }
    }

    fn deny(&self, subject: String) {
        let mut denied = self.denied.lock().unwrap_or_else(|e| e.into_inner());
        let mark = self.denials.fetch_add(1, Ordering::AcqRel) + 1;
        if denied.len() >= DENIALS_KEPT {
            denied.remove(0);
        }
        denied.push((subject, mark));
        drop(denied);
        self.denied_tick.notify_waiters();
    }

    /// How many publish denials have been recorded: a mark to wait for later ones.
    pub fn denial_mark(&self) -> u64 {
        self.denials.load(Ordering::Acquire)
    }

    /// Resolves with the first denial recorded after `mark`: its subject and its own mark.
    pub async fn next_denial(&self, mark: u64) -> (String, u64) {
        loop {
            // Created before the list is read, so a denial recorded in between still wakes it.
            let tick = self.denied_tick.notified();
            let found = {
                let denied = self.denied.lock().unwrap_or_else(|e| e.into_inner());
                denied.iter().find(|(_, at)| *at > mark).cloned()
            };
            if let Some(found) = found {
                return found;
            }
            tick.await;
        }
    }
}

/// Connects, waiting up to `connect_timeout` for the first connection; if NATS is not
/// reachable by then, returns anyway: the client keeps connecting in the background.
pub async fn connect(settings: &NatsSettings) -> Result<(Client, Arc<Health>), SetupError> {
    let health = Arc::new(Health::default());
    let options = connect_options(settings, health.clone()).await?;
    // Each URL separately: async-nats parses a string as ONE URL (a comma-joined list
    // fails with "invalid port number"), so several `nats.servers` need the slice form.
    let servers: Vec<&str> = settings.servers.iter().map(String::as_str).collect();
    let client = options
        .connect(servers.as_slice())
        .await
        .map_err(|e| SetupError::Connect(e.to_string()))?;
    let deadline = Instant::now() + settings.connect_timeout;
    while client.connection_state() != State::Connected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((client, health))
}

/// The JetStream context of `jetstream` mode (in `nats.jetstream_domain` when set).
pub fn jetstream(client: &Client, settings: &NatsSettings) -> Option<jetstream::Context> {
    if settings.mode != Mode::Jetstream {
        return None;
    }
    let builder = jetstream::ContextBuilder::new();
    let builder = match &settings.jetstream_domain {
        Some(domain) => builder.domain(domain.clone()),
        None => builder.api_prefix("$JS.API"),
    };
    Some(
        builder
            .timeout(settings.publish_timeout)
            .max_ack_inflight(65_536)
            .backpressure_on_inflight(true)
            .build(client.clone()),
    )
}

/// Creates or updates the stream (`nats.stream.create`), or checks that it exists and
/// covers the subject template (and the dead-letter template, in dead-letter mode).
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &NatsSettings,
    dead_letter: Option<&SubjectTemplate>,
) -> Result<(), SetupError> {
    let s = &settings.stream;
    let err = |message: String| SetupError::Stream {
        name: s.name.to_string(),
        message,
    };
    if s.create {
        let config = stream::Config {
            name: s.name.to_string(),
            subjects: s.subjects.clone(),
            storage: match s.storage {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            num_replicas: s.replicas,
            max_age: s.max_age,
            duplicate_window: s.duplicate_window,
            ..Default::default()
        };
        js.create_or_update_stream(config).await.map_err(|e| {
            let message = format!("cannot create or update: {e}");
            match e.kind() {
                // No responders (JetStream disabled) is a refusal: start-up stops on it. A
                // timeout, "JetStream system temporarily unavailable" (10008, a cluster
                // still electing its meta leader) or "no suitable peers for placement"
                // (10005: a cluster just started whose nodes have not all joined, or one
                // node down) passes: the stream is set up in the background, and `/readyz`
                // says why meanwhile.
                CreateStreamErrorKind::TimedOut => SetupError::StreamUnanswered {
                    name: s.name.to_string(),
                    message,
                },
                CreateStreamErrorKind::JetStream(e)
                    if e.error_code() == ErrorCode::CLUSTER_NOT_AVAILABLE
                        || e.error_code() == ErrorCode::CLUSTER_NO_PEERS =>
                {
                    SetupError::StreamUnanswered {
                        name: s.name.to_string(),
                        message,
                    }
                }
                _ => err(message),
            }
        })?;
    } else {
        let mut found = js
            .get_stream(&s.name)
            .await
            .map_err(|e| err(format!("cannot be used (nats.stream.create = false): {e}")))?;
        let info = found
            .info()
            .await
            .map_err(|e| err(format!("cannot read its configuration: {e}")))?;
        if !settings.subject.is_covered_by(&info.config.subjects) {
            return Err(err(format!(
                "its subjects {:?} do not cover the template {:?}",
                info.config.subjects,
                settings.subject.as_str()
            )));
        }
        if let Some(dead_letter) = dead_letter {
            if !dead_letter.is_covered_by(&info.config.subjects) {
                return Err(err(format!(
                    "its subjects {:?} do not cover the dead-letter template {:?}",
                    info.config.subjects,
                    dead_letter.as_str()
                )));
            }
        }
    }
    Ok(())
}

async fn connect_options(
    settings: &NatsSettings,
    health: Arc<Health>,
) -> Result<ConnectOptions, SetupError> {
    let mut options = match &settings.creds_file {
        Some(path) => {
            // Read now, so a missing or malformed file stops start-up with its reason; then
            // again at every connection, so a renewed file needs no restart.
            read_creds(path).map_err(SetupError::Credentials)?;
            let path = path.clone();
            let health = health.clone();
            ConnectOptions::with_auth_callback(move |nonce| {
                let path = path.clone();
                let health = health.clone();
                async move { sign_with_creds(&path, &nonce, &health) }
            })
        }
        None => ConnectOptions::new(),
    };
    if settings.token.is_set() {
        options = options.token(settings.token.expose().to_owned());
    }
    if !settings.username.is_empty() {
        options = options.user_and_password(
            settings.username.clone(),
            settings.password.expose().to_owned(),
        );
    }
    if settings.nkey_seed.is_set() {
        options = options.nkey(settings.nkey_seed.expose().trim().to_owned());
    }
    if let Some(ca) = &settings.tls_ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&settings.tls_cert_file, &settings.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let settings = Arc::new(settings.clone());
    Ok(options
        .name(&settings.name)
        .connection_timeout(settings.connect_timeout)
        // The client's default (60 s) leaves a dead connection in place for about three
        // minutes, while every publication on it times out.
        .ping_interval(settings.ping_interval)
        .retry_on_initial_connect()
        .max_reconnects(None)
        // Reconnect quickly after a NATS restart: the default backs off to 4 s.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100u64 << attempts.min(4)).min(1_000))
        })
        .event_callback(move |event| {
            let health = health.clone();
            let settings = settings.clone();
            async move { on_event(event, &health, &settings).await }
        }))
}

async fn on_event(event: Event, health: &Arc<Health>, settings: &Arc<NatsSettings>) {
    match event {
        Event::Connected => {
            health.clear_error();
            health.connected.notify_waiters();
            tracing::info!("NATS connected");
        }
        Event::Disconnected => tracing::warn!("NATS disconnected"),
        Event::ServerError(ServerError::Other(message)) => {
            if let Some(subject) = denied_subject(&message) {
                metrics::publish_denied();
                tracing::error!(
                    subject = %subject,
                    "NATS denied publishing: this user may not publish to the subject; the event is not spooled"
                );
                health.deny(subject);
            } else {
                // Authentication expired or revoked, and other refusals by the server.
                health.set_error(format!("the server refused the connection: {message}"));
            }
        }
        Event::ServerError(ServerError::AuthorizationViolation) => {
            health.set_error(health.authorization_violation())
        }
        Event::ClientError(error) => {
            let reason = error.to_string();
            if reason.contains("authorization violation") {
                health.set_error(health.authorization_violation());
            } else {
                health.set_error(format!("connection attempt failed: {reason}"));
            }
            if uses_tls(settings) && !health.diagnosing.swap(true, Ordering::AcqRel) {
                let health = health.clone();
                let settings = settings.clone();
                tokio::spawn(async move {
                    if let Some(cause) = diagnose_tls(&settings).await {
                        health.set_error(cause);
                    }
                    health.diagnosing.store(false, Ordering::Release);
                });
            }
        }
        other => tracing::warn!(event = %other, "NATS event"),
    }
}

/// The subject of a `Permissions Violation for Publish to "<subject>"` error.
fn denied_subject(message: &str) -> Option<String> {
    let rest = message
        .split("Permissions Violation for Publish to")
        .nth(1)?;
    let subject = rest.trim().trim_matches(|c| c == '"' || c == '\'');
    Some(subject.split_whitespace().next()?.to_owned())
}

fn uses_tls(settings: &NatsSettings) -> bool {
    settings.tls_ca_file.is_some()
        || settings.tls_cert_file.is_some()
        || settings.servers.iter().any(|s| s.starts_with("tls://"))
}

/// The user JWT and nkey seed of a `.creds` file.
fn read_creds(path: &Path) -> Result<(String, nkeys::KeyPair), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let block = |label: &str| -> Option<String> {
        let mut lines = text.lines();
        lines.find(|l| l.starts_with("-----BEGIN") && l.contains(label))?;
        lines
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
    };
    let jwt = block("USER JWT").ok_or_else(|| format!("{}: no user JWT block", path.display()))?;
    let seed =
        block("NKEY SEED").ok_or_else(|| format!("{}: no nkey seed block", path.display()))?;
    let key = nkeys::KeyPair::from_seed(&seed)
        .map_err(|e| format!("{}: the nkey seed is invalid: {e}", path.display()))?;
    Ok((jwt, key))
}

fn sign_with_creds(
    path: &Path,
    nonce: &[u8],
    health: &Health,
) -> Result<async_nats::Auth, AuthError> {
    let (jwt, key) = read_creds(path).map_err(AuthError::new)?;
    health.set_credentials_problem(jwt_expiry_problem(&jwt, path));
    let signature = key
        .sign(nonce)
        .map_err(|e| AuthError::new(format!("cannot sign the server's nonce: {e}")))?;
    let mut auth = async_nats::Auth::new();
    auth.jwt = Some(jwt);
    auth.signature = Some(signature);
    Ok(auth)
}

/// When the user JWT has expired, says so (the server only answers "authorization
/// violation"). Claims are read, not verified: the server does that.
fn jwt_expiry_problem(jwt: &str, path: &Path) -> Option<String> {
    use base64::Engine;
    let claims = jwt.split('.').nth(1)?;
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&claims).ok()?;
    let exp = claims.get("exp")?.as_i64()?;
    let now = jiff::Timestamp::now().as_second();
    (exp <= now).then(|| {
        let at = jiff::Timestamp::from_second(exp)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| exp.to_string());
        format!(
            "the user JWT in nats.creds_file {} expired at {at}",
            path.display()
        )
    })
}

/// Host and port of a server URL (`nats://user:pass@host:4222`, `tls://host`).
fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, port) = v6.split_once(']')?;
        let port = port
            .strip_prefix(':')
            .map_or(Some(4222), |p| p.parse().ok())?;
        return Some((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.to_owned(), port.parse().ok()?)),
        None => Some((authority.to_owned(), 4222)),
    }
}

/// Repeats the TLS part of a connection with the configured CA and client certificate, and
/// says what went wrong, if anything did (`None`: TLS itself works).
async fn diagnose_tls(settings: &NatsSettings) -> Option<String> {
    const STEP: Duration = Duration::from_secs(2);
    let (host, port) = host_port(settings.servers.first()?)?;
    let config = match tls_config(settings) {
        Ok(Some(config)) => config,
        Ok(None) => return None,
        Err(e) => return Some(e),
    };
    let tcp =
        match tokio::time::timeout(STEP, tokio::net::TcpStream::connect((host.as_str(), port)))
            .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Some(format!("cannot reach {host}:{port}: {e}")),
            Err(_) => return Some(format!("cannot reach {host}:{port}: timed out")),
        };
    // NATS greets in plain text (INFO) before the client upgrades to TLS.
    let mut reader = BufReader::new(tcp);
    let mut info = String::new();
    if !matches!(tokio::time::timeout(STEP, reader.read_line(&mut info)).await, Ok(Ok(n)) if n > 0)
    {
        return None;
    }
    let name = ServerName::try_from(host.clone()).ok()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match tokio::time::timeout(STEP, connector.connect(name, reader.into_inner())).await {
        Ok(Ok(mut tls)) => {
            // A server that requires a client certificate refuses a missing one only after
            // the handshake (TLS 1.3), with an alert on the first read.
            let mut byte = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(500), tls.read(&mut byte)).await {
                Ok(Err(e)) => Some(format!(
                    "TLS with {host}:{port} refused after the handshake: {e}{}",
                    hint(&e.to_string(), settings)
                )),
                _ => None,
            }
        }
        Ok(Err(e)) => Some(format!(
            "TLS handshake with {host}:{port} failed: {e}{}",
            hint(&e.to_string(), settings)
        )),
        Err(_) => Some(format!("TLS handshake with {host}:{port} timed out")),
    }
}

/// A hint in the operator's terms for the commonest TLS failures.
fn hint(error: &str, settings: &NatsSettings) -> String {
    if error.contains("UnknownIssuer") || error.contains("unknown issuer") {
        " (the server's certificate is not signed by nats.tls_ca_file)".into()
    } else if error.contains("NotValidForName") || error.contains("not valid for name") {
        " (the server's certificate is not valid for the host name in nats.servers)".into()
    } else if error.contains("CertificateRequired") || error.contains("BadCertificate") {
        if settings.tls_cert_file.is_none() {
            " (the server requires a client certificate: set nats.tls_cert_file and nats.tls_key_file)".into()
        } else {
            " (the server does not accept the client certificate nats.tls_cert_file)".into()
        }
    } else {
        String::new()
    }
}

fn tls_config(settings: &NatsSettings) -> Result<Option<rustls::ClientConfig>, String> {
    let Some(ca) = &settings.tls_ca_file else {
        return Ok(None);
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca, "nats.tls_ca_file")? {
        roots
            .add(cert)
            .map_err(|e| format!("nats.tls_ca_file {}: {e}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    let config = match (&settings.tls_cert_file, &settings.tls_key_file) {
        (Some(cert), Some(key)) => {
            let certs = read_certs(cert, "nats.tls_cert_file")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("nats.tls_key_file {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("nats.tls_key_file: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(config))
}

fn read_certs(path: &PathBuf, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{key} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{key} {}: no certificate found", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_denied_subject_is_read_from_the_server_error() {
        assert_eq!(
            denied_subject("Permissions Violation for Publish to \"cmc.bounces.2\"").as_deref(),
            Some("cmc.bounces.2")
        );
        assert_eq!(denied_subject("Authorization Violation"), None);
    }

    #[test]
    fn host_and_port_of_server_urls() {
        assert_eq!(
            host_port("nats://127.0.0.1:4222"),
            Some(("127.0.0.1".into(), 4222))
        );
        assert_eq!(
            host_port("tls://u:p@localhost"),
            Some(("localhost".into(), 4222))
        );
        assert_eq!(host_port("nats://[::1]:5222"), Some(("::1".into(), 5222)));
        assert_eq!(host_port("localhost:7"), Some(("localhost".into(), 7)));
    }
}
