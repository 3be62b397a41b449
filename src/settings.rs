//! Configuration (SPEC §4): one TOML file layered under `CMC_FORWARDER__SECTION__KEY`
//! environment variables, deserialised once, in [`Settings::load`], into the types the service
//! uses (socket addresses, networks, durations, the compiled subject template, the time zone,
//! secrets), then checked across keys. Nothing re-parses or re-validates a value afterwards.
//!
//! Every key has a default, so the service runs with no file against a local NATS. Unknown
//! keys and invalid values stop start-up with a message naming the key (and the environment
//! variable, when one set it). An environment value is typed by its key: string keys take the
//! text exactly as written (`007123` stays `007123`), number and boolean keys are parsed, list
//! keys are split at commas. Secrets live in [`Secret`], which never prints its value. Owns no
//! I/O beyond reading the file.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::subject::{filters_overlap, InboundSubject, Placeholder, SubjectTemplate};
use crate::webhook::{HeaderShape, InvalidEntries};

mod names;
pub use names::{BucketName, EndpointPath, JetStreamDomain, StreamName};

/// The environment prefix; `CMC_FORWARDER__NATS__MODE=core` sets `nats.mode`.
pub const ENV_PREFIX: &str = "CMC_FORWARDER";

/// The conventional NATS variable, used for `nats.servers` when nothing else sets it.
pub const NATS_URL: &str = "NATS_URL";

/// What `check-config` prints in place of a set secret. The loader refuses it, so a printed
/// configuration fed back can never run with this text as the real secret.
pub const REDACTED: &str = "[redacted]";

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// `[server]`: the public webhook listener.
    pub server: ServerSettings,
    /// `[admin]`: health, readiness and metrics.
    pub admin: AdminSettings,
    /// `[auth]`: who may post.
    pub auth: AuthSettings,
    /// `[nats]`: the connection, the subject and the stream.
    pub nats: NatsSettings,
    /// `[spool]`: the durable local buffer.
    pub spool: SpoolSettings,
    /// `[validation]`: what happens to entries that fail validation.
    pub validation: ValidationSettings,
    /// `[inbound]`: the Inbound webhook (SPEC §7).
    pub inbound: InboundSettings,
    /// `[cmc]`: facts about the CMC account.
    pub cmc: CmcSettings,
    /// `[log]`: log output.
    pub log: LogSettings,
    /// `[telemetry]`: trace export.
    pub telemetry: TelemetrySettings,
}

/// The public webhook listener.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address and port the webhook listener binds (port 0 picks a free one).
    pub listen: SocketAddr,
    /// The path CMC posts to; every other path answers 404. Starts with `/`.
    pub path: String,
    /// Largest accepted body, in bytes; larger ones answer 413 (counted while reading, with or
    /// without `Content-Length`).
    pub max_body_bytes: u64,
    /// Time allowed to receive a whole request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests handled at once; beyond it the service answers 503 instead of queueing.
    pub max_in_flight: usize,
    /// Bytes of request bodies held at once; beyond it the service answers 503.
    pub max_in_flight_bytes: u64,
    /// Entries accepted in one request; more answer 413.
    pub max_entries: usize,
    /// Open connections at once; more wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// After SIGTERM/SIGINT: time in-flight requests get before their connections are closed.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// PEM certificate chain for native TLS (with `tls_key_file`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for native TLS (with `tls_cert_file`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            path: "/webhooks/cmc".into(),
            max_body_bytes: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            max_in_flight: 1024,
            max_in_flight_bytes: 256 * 1024 * 1024,
            max_entries: 10_000,
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(10),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// The admin listener (health, readiness, metrics), kept off the public port.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Address of the admin listener; `""` (here `None`) disables it.
    #[serde(with = "optional_addr")]
    pub listen: Option<SocketAddr>,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9091))),
        }
    }
}

/// Who may post webhooks.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// When any is set, the request's `api_key` parameter must match one of them: a string,
    /// or a list during a key rotation.
    pub api_key: ApiKeys,
    /// When non-empty, HTTP Basic authentication is required (with `basic_password`).
    pub basic_username: String,
    /// The HTTP Basic password (with `basic_username`).
    pub basic_password: Secret,
    /// More HTTP Basic users, each accepted beside `basic_username` (a password rotation
    /// lists one user twice).
    pub basic_credentials: Vec<BasicCredential>,
    /// Client networks allowed to post (CIDRs or single addresses); empty allows all.
    #[serde(with = "networks")]
    pub allowed_ips: Vec<IpNet>,
    /// Proxies (CIDRs or single addresses) whose `X-Forwarded-For` is believed.
    #[serde(with = "networks")]
    pub trusted_proxies: Vec<IpNet>,
}

impl AuthSettings {
    /// How many API keys and Basic users are accepted, never what they are (`check-config`).
    pub fn summary(&self) -> String {
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        format!(
            "{} accepted, {} accepted",
            plural(self.api_key.keys().len(), "API key"),
            plural(self.basic_users().len(), "HTTP Basic user")
        )
    }

    /// Every accepted HTTP Basic user: `basic_username` first when set, then
    /// `basic_credentials` in their order.
    pub fn basic_users(&self) -> Vec<BasicCredential> {
        let single = (!self.basic_username.is_empty()).then(|| BasicCredential {
            username: self.basic_username.clone(),
            password: self.basic_password.clone(),
        });
        single
            .into_iter()
            .chain(self.basic_credentials.iter().cloned())
            .collect()
    }
}

/// One accepted HTTP Basic user of `auth.basic_credentials`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BasicCredential {
    pub username: String,
    pub password: Secret,
}

/// `auth.api_key`: the accepted keys, in their configured order (a key's position is its
/// metric label). Written as one string (`""` for none) or a list of strings; printed the
/// same way, every key redacted, so the printed form tells how many there are and nothing
/// more.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiKeys(Vec<Secret>);

impl ApiKeys {
    /// The keys, in order.
    pub fn new(keys: impl IntoIterator<Item = Secret>) -> ApiKeys {
        ApiKeys(keys.into_iter().collect())
    }

    /// The keys, in order; empty when no key is required.
    pub fn keys(&self) -> &[Secret] {
        &self.0
    }
}

impl From<Secret> for ApiKeys {
    fn from(key: Secret) -> ApiKeys {
        ApiKeys(if key.is_set() { vec![key] } else { Vec::new() })
    }
}

impl Serialize for ApiKeys {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [] => s.serialize_str(""),
            [one] => one.serialize(s),
            many => s.collect_seq(many),
        }
    }
}

impl<'de> Deserialize<'de> for ApiKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match toml::Value::deserialize(d)? {
            value @ toml::Value::String(_) => Secret::deserialize(value)
                .map(ApiKeys::from)
                .map_err(|e| D::Error::custom(e.message().trim())),
            value @ toml::Value::Array(_) => {
                let keys = Vec::<Secret>::deserialize(value)
                    .map_err(|e| D::Error::custom(e.message().trim()))?;
                match keys.iter().position(|k| !k.is_set()) {
                    Some(i) => Err(D::Error::custom(format!(
                        "key {i} of the list is empty (a list holds only keys that are set)"
                    ))),
                    None => Ok(ApiKeys(keys)),
                }
            }
            other => Err(D::Error::custom(format!(
                "must be a string or a list of strings, not {}",
                other.type_str()
            ))),
        }
    }
}

/// How messages are delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Publish to JetStream and await every PubAck before answering.
    #[default]
    Jetstream,
    /// Plain publish, then flush before answering.
    Core,
}

/// The NATS connection and subject.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Server URLs; the client reconnects across all of them. Blank entries are dropped.
    pub servers: Vec<String>,
    /// `jetstream` (await PubAcks) or `core` (publish and flush).
    pub mode: Mode,
    /// Subject template; placeholders `{event_type}`, `{status}`, `{status_name}`,
    /// `{server_composition}`. Compiled when the configuration is loaded.
    pub subject: SubjectTemplate,
    /// `full` (SPEC §2) or `minimal` (`Nats-Msg-Id` and `Cmc-Batch-Id` only).
    pub headers: HeaderShape,
    /// Time a batch may take to be acknowledged before the request answers 503.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Time allowed for the first connection at start-up before the service starts anyway.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How often the client pings the server. A connection that no longer carries anything
    /// (a peer or a network that dropped it without a reset) is found dead after two
    /// unanswered pings, i.e. within about three intervals, and the client reconnects.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Client name shown in the server's connection list.
    pub name: String,
    /// A `.creds` file (user JWT and nkey seed) for operator-mode (decentralised) auth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// A token for token authentication.
    pub token: Secret,
    /// User name for user/password authentication (with `password`).
    pub username: String,
    /// Password for user/password authentication.
    pub password: Secret,
    /// A user nkey seed (`SU…`) for nkey authentication.
    pub nkey_seed: Secret,
    /// PEM CA certificate(s) that sign the server's certificate; setting it requires TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `tls_key_file`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// JetStream domain whose API serves the stream (`$JS.<domain>.API`), e.g. the hub's
    /// domain when the forwarder is connected to a leaf node; unset uses the local JetStream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jetstream_domain: Option<JetStreamDomain>,
    /// `[nats.stream]`: the stream (jetstream mode).
    pub stream: StreamSettings,
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings {
            servers: vec!["nats://127.0.0.1:4222".into()],
            mode: Mode::Jetstream,
            subject: SubjectTemplate::parse("cmc.{event_type}.{status}")
                .expect("the default template is valid"),
            headers: HeaderShape::Full,
            publish_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(10),
            name: "cmc-forwarder".into(),
            creds_file: None,
            token: Secret::default(),
            username: String::new(),
            password: Secret::default(),
            nkey_seed: Secret::default(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            jetstream_domain: None,
            stream: StreamSettings::default(),
        }
    }
}

/// Stream storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On disk.
    #[default]
    File,
    /// In memory (lost when the server restarts).
    Memory,
}

/// The JetStream stream the messages are stored in (`jetstream` mode).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// The stream's name (no whitespace, `.`, `*`, `>`, `/` or `\`).
    pub name: StreamName,
    /// Create or update the stream at start-up; when false it must already exist.
    pub create: bool,
    /// The stream's subjects; every subject the template can produce must fall under one.
    pub subjects: Vec<String>,
    /// `file` or `memory`.
    pub storage: Storage,
    /// Copies of each message in a cluster (1 to 5).
    pub replicas: usize,
    /// Age after which messages are discarded; `0s` keeps them forever.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Window in which a repeated `Nats-Msg-Id` is dropped as a duplicate. The default (10
    /// minutes) covers `spool.retain` plus an outage of NATS of several minutes: what the
    /// retained log publishes again after NATS lost power is stored once.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            name: StreamName::try_from("CMC_EVENTS").expect("a valid name"),
            create: true,
            subjects: vec!["cmc.>".into()],
            storage: Storage::File,
            replicas: 1,
            max_age: Duration::ZERO,
            duplicate_window: Duration::from_secs(600),
        }
    }
}

/// The durable local buffer.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSettings {
    /// Spool what NATS cannot take in time (answering 200) instead of answering 503.
    pub enabled: bool,
    /// Directory of the spool files; relative to the working directory.
    pub dir: PathBuf,
    /// Size at which new batches are refused with 503.
    pub max_bytes: u64,
    /// Longest pause between the drainer's retries of a temporary failure.
    #[serde(with = "humantime_serde")]
    pub retry_max_interval: Duration,
    /// How long NATS may hold an acknowledged message before it syncs it: nats-server's
    /// `sync_interval` (2 min by default). Acknowledged records are kept that long (and a
    /// second more) after the acknowledgement, while connected, to be published again if NATS
    /// restarts. `0s` turns the retained log off (a `200` then does not survive a power cut
    /// of NATS).
    #[serde(with = "humantime_serde")]
    pub retain: Duration,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        SpoolSettings {
            enabled: true,
            dir: "data/spool".into(),
            max_bytes: 1 << 30,
            retry_max_interval: Duration::from_secs(5),
            retain: Duration::from_secs(120),
        }
    }
}

/// What happens to invalid entries (SPEC §1 "Validation is all-or-nothing (by default)").
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationSettings {
    /// `reject` (422, nothing published) or `dead_letter` (each invalid entry goes out on
    /// `dead_letter_subject`, the valid ones as usual).
    pub invalid_entries: InvalidEntries,
    /// Subject template of dead letters; placeholders `{event_type}`, `{server_composition}`
    /// (an invalid entry may have no usable status).
    pub dead_letter_subject: SubjectTemplate,
}

impl Default for ValidationSettings {
    fn default() -> Self {
        ValidationSettings {
            invalid_entries: InvalidEntries::Reject,
            dead_letter_subject: SubjectTemplate::parse("cmc.invalid.{event_type}")
                .expect("the default template is valid"),
        }
    }
}

/// The Inbound webhook (received mail, SPEC §7).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboundSettings {
    /// Path of the inbound endpoint; `""` disables it.
    pub path: EndpointPath,
    /// Subject template of inbound mail (placeholders `{filter}`, `{server_composition}`).
    /// Compiled when the configuration is loaded.
    pub subject: InboundSubject,
    /// Largest accepted inbound body, in bytes.
    pub max_body_bytes: u64,
    /// JetStream object store bucket for attachments (`[A-Za-z0-9_-]+`).
    pub bucket: BucketName,
}

impl Default for InboundSettings {
    fn default() -> Self {
        InboundSettings {
            path: EndpointPath::try_from("/webhooks/cmc/inbound").expect("a valid path"),
            subject: InboundSubject::parse("cmc.inbound.{filter}")
                .expect("the default template is valid"),
            max_body_bytes: 32 * 1024 * 1024,
            bucket: BucketName::try_from("CMC_INBOUND").expect("a valid name"),
        }
    }
}

/// Facts about the CMC account.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CmcSettings {
    /// CMC console's time zone (IANA name or `+09:00`); adds `created_at` to bodies. `""`
    /// (here `None`) leaves it out.
    #[serde(
        deserialize_with = "optional_zone",
        skip_serializing_if = "Option::is_none"
    )]
    pub timezone: Option<Zone>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `cmc_forwarder=debug`; `RUST_LOG` overrides it.
    pub level: LogFilter,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            level: LogFilter("info".into()),
        }
    }
}

/// Export of request spans.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// OTLP/HTTP collector base URL (`http://otel-collector:4318`); spans are POSTed to
    /// `<endpoint>/v1/traces`. Empty: no export.
    pub otlp_endpoint: String,
}

/// A checked `tracing` filter directive (`info`, `cmc_forwarder=debug,warn`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct LogFilter(String);

impl LogFilter {
    /// The directive, as [`tracing_subscriber::EnvFilter`] takes it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for LogFilter {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        tracing_subscriber::EnvFilter::try_new(&text)
            .map(|_| LogFilter(text.clone()))
            .map_err(|e| format!("{text:?} is not a log filter: {e}"))
    }
}

impl From<LogFilter> for String {
    fn from(filter: LogFilter) -> String {
        filter.0
    }
}

/// The CMC console's time zone: the text as configured, and the zone it names.
#[derive(Debug, Clone)]
pub struct Zone {
    text: String,
    zone: jiff::tz::TimeZone,
}

impl Zone {
    /// Parses an IANA name or a `±HH:MM` offset (see [`parse_timezone`]).
    pub fn parse(text: &str) -> Result<Zone, String> {
        Ok(Zone {
            zone: parse_timezone(text)?,
            text: text.trim().to_owned(),
        })
    }

    /// The zone.
    pub fn zone(&self) -> &jiff::tz::TimeZone {
        &self.zone
    }
}

impl PartialEq for Zone {
    fn eq(&self, other: &Zone) -> bool {
        self.text == other.text
    }
}

impl Serialize for Zone {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

fn optional_zone<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Zone>, D::Error> {
    let text = String::deserialize(d)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    Zone::parse(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `admin.listen`: an address, or `""` for none.
mod optional_addr {
    use super::*;

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        text.trim()
            .parse()
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
    }
}

/// Lists of networks: CIDRs (`10.0.0.0/8`) or single addresses (`10.0.0.1`); blank entries
/// are dropped. Written back as CIDRs.
mod networks {
    use super::*;

    pub fn serialize<S: Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(nets.iter().map(|n| n.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| parse_network(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Parses a CIDR (`10.0.0.0/8`) or a single address (`10.0.0.1`, a /32 or /128).
pub fn parse_network(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text:?} is not a CIDR or IP address"))
}

/// A secret value: never shown by `Debug` or serialisation, compared by its bytes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether a (non-empty) value is set.
    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }

    fn shown(&self) -> &'static str {
        if self.is_set() {
            REDACTED
        } else {
            ""
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.shown())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = String::deserialize(d)?;
        if value == REDACTED {
            return Err(serde::de::Error::custom(format!(
                "{REDACTED:?} is the placeholder check-config prints instead of a secret; \
                 put the real secret here (or set it through the environment)"
            )));
        }
        Ok(Secret(value))
    }
}

/// Configuration that cannot be used; the message names the key.
#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("cannot read configuration file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration: {key}: {message}")]
    Invalid { key: String, message: String },
    #[error("invalid configuration: environment variable {var}: {message}")]
    Env { var: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

impl Settings {
    /// Loads the optional TOML file, then the environment: `env` is the process environment
    /// when `None`, and a plain map in tests (never mutate the process environment).
    pub fn load(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Settings, SettingsError> {
        let text = match file {
            Some(path) => Some(
                std::fs::read_to_string(path).map_err(|e| SettingsError::File {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?,
            ),
            None => None,
        };
        let env: BTreeMap<String, String> = match env {
            Some(map) => map.into_iter().collect(),
            None => std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        };
        Settings::from_sources(text.as_deref(), &env)
    }

    /// Loads from a TOML string alone (tests and examples).
    pub fn from_toml(text: &str) -> Result<Settings, SettingsError> {
        Settings::from_sources(Some(text), &BTreeMap::new())
    }

    /// The one place configuration is parsed: the file's table, the environment laid over it
    /// (typed by each key's type), `NATS_URL` as the fallback for `nats.servers`, then a
    /// single deserialisation into the typed settings and the checks across keys.
    fn from_sources(
        text: Option<&str>,
        env: &BTreeMap<String, String>,
    ) -> Result<Settings, SettingsError> {
        let mut table: toml::Table = match text {
            Some(text) => toml::from_str(text)
                .map_err(|e| SettingsError::Parse(e.to_string().trim_end().to_owned()))?,
            None => toml::Table::new(),
        };
        let file_sets_servers = lookup(&table, &["nats", "servers"]).is_some();
        let schema = toml::Table::try_from(Settings::default())
            .map_err(|e| SettingsError::Parse(format!("cannot describe the defaults: {e}")))?;
        // Which variable set which key, to name it in errors.
        let mut origins: Vec<(String, String)> = Vec::new();
        // Lists set item by item: key -> (its path, position -> (variable, item)).
        type Numbered = BTreeMap<usize, (String, toml::Value)>;
        let mut items: BTreeMap<String, (Vec<String>, Numbered)> = BTreeMap::new();
        let prefix = format!("{ENV_PREFIX}__");
        for (var, value) in env {
            let Some(rest) = var.strip_prefix(&prefix) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if path.iter().any(String::is_empty) {
                return Err(env_error(
                    var,
                    "is not of the form CMC_FORWARDER__SECTION__KEY",
                ));
            }
            let keys: Vec<&str> = path.iter().map(String::as_str).collect();
            // A numbered segment sets one item of a list, so that no value is ever split
            // (secrets may hold commas): …__API_KEY__0, …__BASIC_CREDENTIALS__1__USERNAME.
            if let Some(at) = (1..keys.len()).find(|&i| is_index(keys[i])) {
                let (list, index, rest) = (&keys[..at], keys[at], &keys[at + 1..]);
                let index: usize = index
                    .parse()
                    .map_err(|_| env_error(var, format!("{index} is not a list position")))?;
                let item = items
                    .entry(list.join("."))
                    .or_insert_with(|| {
                        (
                            list.iter().map(|k| k.to_string()).collect(),
                            BTreeMap::new(),
                        )
                    })
                    .1
                    .entry(index)
                    .or_insert_with(|| (var.clone(), toml::Value::Table(toml::Table::new())));
                let text = toml::Value::String(value.clone());
                match (&mut item.1, rest.is_empty()) {
                    (toml::Value::Table(t), true) if t.is_empty() => item.1 = text,
                    (toml::Value::Table(t), false) => {
                        insert(t, rest, text).map_err(|m| env_error(var, m))?
                    }
                    _ => {
                        return Err(env_error(
                            var,
                            format!("sets item {index} of {} a second way", list.join(".")),
                        ))
                    }
                }
                let mut key = format!("{}[{index}]", list.join("."));
                for k in rest {
                    key.push('.');
                    key.push_str(k);
                }
                origins.push((key, var.clone()));
                continue;
            }
            let typed =
                typed_env_value(lookup(&schema, &keys), value).map_err(|m| env_error(var, m))?;
            insert(&mut table, &keys, typed).map_err(|m| env_error(var, m))?;
            origins.push((path.join("."), var.clone()));
        }
        for (key, (path, numbered)) in items {
            if let Some((_, var)) = origins.iter().find(|(k, _)| *k == key) {
                return Err(env_error(
                    var,
                    format!("sets {key}, which numbered variables ({key} item 0, …) set too"),
                ));
            }
            if let Some((expected, (var, _))) = numbered
                .iter()
                .enumerate()
                .find(|(i, (index, _))| i != *index)
                .map(|(i, (_, item))| (i, item))
            {
                return Err(env_error(
                    var,
                    format!("the items of {key} are numbered from 0 without gaps, and {expected} is missing"),
                ));
            }
            let keys: Vec<&str> = path.iter().map(String::as_str).collect();
            let list = numbered.into_values().map(|(_, value)| value).collect();
            insert(&mut table, &keys, toml::Value::Array(list)).map_err(|m| invalid(&key, m))?;
        }
        let env_sets_servers = env.keys().any(|var| {
            var.strip_prefix(&format!("{prefix}NATS__SERVERS"))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("__"))
        });
        if !file_sets_servers && !env_sets_servers {
            if let Some(urls) = env.get(NATS_URL).filter(|u| !u.trim().is_empty()) {
                insert(&mut table, &["nats", "servers"], list(urls))
                    .map_err(|m| env_error(NATS_URL, m))?;
                origins.push(("nats.servers".into(), NATS_URL.into()));
            }
        }
        let mut settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                let message = e.inner().message().trim().to_owned();
                // An item set from the environment is named by its variable, even when
                // the error is the item's (a field missing) rather than one field's.
                let under = |k: &str| {
                    k.strip_prefix(key.as_str())
                        .is_some_and(|rest| key.ends_with(']') && rest.starts_with('.'))
                };
                match origins.iter().find(|(k, _)| *k == key || under(k)) {
                    Some((_, var)) => env_error(var, format!("{key}: {message}")),
                    None => invalid(&key, message),
                }
            })?;
        settings.nats.servers = settings
            .nats
            .servers
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        settings.check()?;
        Ok(settings)
    }

    /// Checks across keys, and the bounds serde alone cannot express. Run once, by the loader.
    fn check(&self) -> Result<(), SettingsError> {
        let server = &self.server;
        if !server.path.starts_with('/') {
            return Err(invalid("server.path", "must start with '/'"));
        }
        for (key, value) in [
            ("server.max_body_bytes", server.max_body_bytes),
            ("server.max_in_flight", server.max_in_flight as u64),
            ("server.max_in_flight_bytes", server.max_in_flight_bytes),
            ("server.max_entries", server.max_entries as u64),
            ("server.max_connections", server.max_connections as u64),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        for (key, value) in [
            ("server.request_timeout", server.request_timeout),
            ("nats.publish_timeout", self.nats.publish_timeout),
            ("nats.connect_timeout", self.nats.connect_timeout),
            ("nats.ping_interval", self.nats.ping_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if server.tls_cert_file.is_some() != server.tls_key_file.is_some() {
            return Err(invalid(
                "server.tls_cert_file",
                "tls_cert_file and tls_key_file must be set together",
            ));
        }
        let nats = &self.nats;
        if nats.servers.is_empty() {
            return Err(invalid("nats.servers", "at least one server is required"));
        }
        if nats.tls_cert_file.is_some() != nats.tls_key_file.is_some() {
            return Err(invalid(
                "nats.tls_cert_file",
                "tls_cert_file and tls_key_file must be set together",
            ));
        }
        if nats.username.is_empty() && nats.password.is_set() {
            return Err(invalid("nats.password", "is set without nats.username"));
        }
        if nats.mode == Mode::Jetstream {
            let stream = &nats.stream;
            if stream.replicas == 0 || stream.replicas > 5 {
                return Err(invalid("nats.stream.replicas", "must be between 1 and 5"));
            }
            if !stream.max_age.is_zero() && stream.duplicate_window > stream.max_age {
                // JetStream refuses such a stream; say so before connecting.
                return Err(invalid(
                    "nats.stream.duplicate_window",
                    "must not be longer than nats.stream.max_age",
                ));
            }
            if stream.subjects.is_empty() {
                return Err(invalid("nats.stream.subjects", "at least one is required"));
            }
            if let Some(dead_letter) = self.dead_letter_template() {
                if !dead_letter.is_covered_by(&stream.subjects) {
                    return Err(invalid(
                        "validation.dead_letter_subject",
                        format!(
                            "subjects of the template {:?} (i.e. {}) do not all fall under nats.stream.subjects {:?}",
                            dead_letter.as_str(),
                            dead_letter.as_filter(),
                            stream.subjects
                        ),
                    ));
                }
            }
            let template = &nats.subject;
            if !template.is_covered_by(&stream.subjects) {
                return Err(invalid(
                    "nats.subject",
                    format!(
                        "subjects of the template {:?} (i.e. {}) do not all fall under nats.stream.subjects {:?}",
                        template.as_str(),
                        template.as_filter(),
                        stream.subjects
                    ),
                ));
            }
        }
        if self.auth.basic_username.is_empty() == self.auth.basic_password.is_set() {
            return Err(invalid(
                "auth.basic_username",
                "basic_username and basic_password must be set together",
            ));
        }
        for (i, user) in self.auth.basic_credentials.iter().enumerate() {
            if user.username.is_empty() {
                return Err(invalid(
                    &format!("auth.basic_credentials[{i}].username"),
                    "must be set",
                ));
            }
            if !user.password.is_set() {
                return Err(invalid(
                    &format!("auth.basic_credentials[{i}].password"),
                    "must be set",
                ));
            }
        }
        if self.spool.enabled && self.spool.max_bytes == 0 {
            return Err(invalid("spool.max_bytes", "must be greater than 0"));
        }
        let dead_letter = &self.validation.dead_letter_subject;
        if self.validation.invalid_entries == InvalidEntries::DeadLetter
            && (dead_letter.uses(Placeholder::Status) || dead_letter.uses(Placeholder::StatusName))
        {
            return Err(invalid(
                "validation.dead_letter_subject",
                "may use only {event_type} and {server_composition}: an invalid entry has no usable status",
            ));
        }
        let endpoint = self.telemetry.otlp_endpoint.trim();
        if !endpoint.is_empty() && !endpoint.starts_with("http://") {
            return Err(invalid(
                "telemetry.otlp_endpoint",
                format!("{endpoint:?} must be an http:// URL of an OTLP/HTTP collector, or empty"),
            ));
        }
        self.check_inbound()
    }

    /// The rules of `[inbound]` that span several keys: a path of its own, and in `jetstream`
    /// mode a subject covered by the events stream, which must leave the object store's
    /// subjects alone. Nothing is checked when the endpoint is off.
    fn check_inbound(&self) -> Result<(), SettingsError> {
        let inbound = &self.inbound;
        if inbound.path.is_empty() {
            return Ok(());
        }
        if *inbound.path == *self.server.path {
            return Err(invalid("inbound.path", "must differ from server.path"));
        }
        if inbound.max_body_bytes == 0 {
            return Err(invalid("inbound.max_body_bytes", "must be greater than 0"));
        }
        if self.nats.mode != Mode::Jetstream {
            return Ok(());
        }
        let subjects = &self.nats.stream.subjects;
        let template = &inbound.subject;
        if !template.is_covered_by(subjects) {
            return Err(invalid(
                "inbound.subject",
                format!(
                    "subjects of the template {:?} (i.e. {}) do not all fall under nats.stream.subjects {:?}",
                    template.as_str(),
                    template.as_filter(),
                    subjects
                ),
            ));
        }
        let objects = format!("$O.{}.>", inbound.bucket);
        if let Some(s) = subjects.iter().find(|s| filters_overlap(s, &objects)) {
            return Err(invalid(
                "nats.stream.subjects",
                format!("{s:?} overlaps the object store's subjects {objects:?} (inbound.bucket)"),
            ));
        }
        Ok(())
    }

    /// The dead-letter subject template, in dead-letter mode (checked by the loader).
    pub fn dead_letter_template(&self) -> Option<SubjectTemplate> {
        (self.validation.invalid_entries == InvalidEntries::DeadLetter)
            .then(|| self.validation.dead_letter_subject.clone())
    }

    /// The effective configuration as TOML, secrets replaced by [`REDACTED`]. Fed back to the
    /// loader it gives the same configuration, except that every set secret must be supplied
    /// again (the loader refuses the placeholder).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

fn env_error(var: &str, message: impl Into<String>) -> SettingsError {
    SettingsError::Env {
        var: var.to_owned(),
        message: message.into(),
    }
}

fn lookup<'a>(table: &'a toml::Table, keys: &[&str]) -> Option<&'a toml::Value> {
    let (last, parents) = keys.split_last()?;
    let mut table = table;
    for key in parents {
        table = table.get(*key)?.as_table()?;
    }
    table.get(*last)
}

fn insert(table: &mut toml::Table, keys: &[&str], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = keys.split_last() else {
        return Err("names no key".into());
    };
    let mut table = table;
    for key in parents {
        table = table
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("{key} is not a section"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

/// Whether an environment path segment is a list position (`0`, `1`, …).
fn is_index(segment: &str) -> bool {
    !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit())
}

fn list(text: &str) -> toml::Value {
    toml::Value::Array(
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| toml::Value::String(s.to_owned()))
            .collect(),
    )
}

/// An environment value typed by its key, as the defaults show the key's type: numbers and
/// booleans are parsed, lists split at commas, and every other key (strings, secrets, paths,
/// durations, optional keys) takes the text exactly as written.
fn typed_env_value(schema: Option<&toml::Value>, text: &str) -> Result<toml::Value, String> {
    Ok(match schema {
        Some(toml::Value::Integer(_)) => toml::Value::Integer(
            text.trim()
                .parse()
                .map_err(|_| format!("{text:?} is not a whole number"))?,
        ),
        Some(toml::Value::Boolean(_)) => toml::Value::Boolean(match text.trim() {
            t if t.eq_ignore_ascii_case("true") => true,
            t if t.eq_ignore_ascii_case("false") => false,
            _ => return Err(format!("{text:?} is not true or false")),
        }),
        Some(toml::Value::Float(_)) => toml::Value::Float(
            text.trim()
                .parse()
                .map_err(|_| format!("{text:?} is not a number"))?,
        ),
        Some(toml::Value::Array(_)) => list(text),
        Some(toml::Value::Table(_)) => {
            return Err("names a section, not a key".into());
        }
        _ => toml::Value::String(text.to_owned()),
    })
}

/// Parses an IANA zone name (`Asia/Tokyo`, from the bundled database, so it works on hosts
/// without tzdata) or a fixed offset `±HH:MM` (also `UTC` / `Z`).
pub fn parse_timezone(text: &str) -> Result<jiff::tz::TimeZone, String> {
    use jiff::tz::{Offset, TimeZone};
    let text = text.trim();
    if text.eq_ignore_ascii_case("utc") || text == "Z" {
        return Ok(TimeZone::UTC);
    }
    let b = text.as_bytes();
    if b.len() == 6 && matches!(b[0], b'+' | b'-') && b[3] == b':' {
        let digits = |s: &str| {
            s.parse::<i32>()
                .ok()
                .filter(|_| s.bytes().all(|c| c.is_ascii_digit()))
        };
        if let (Some(h), Some(m)) = (digits(&text[1..3]), digits(&text[4..6])) {
            if h <= 23 && m <= 59 {
                let seconds = (h * 3600 + m * 60) * if b[0] == b'-' { -1 } else { 1 };
                return Offset::from_seconds(seconds)
                    .map(TimeZone::fixed)
                    .map_err(|e| e.to_string());
            }
        }
        return Err(format!("{text:?} is not a valid offset (expected ±HH:MM)"));
    }
    TimeZone::get(text).map_err(|e| format!("{text:?} is not a known time zone: {e}"))
}

#[cfg(test)]
mod tests;
