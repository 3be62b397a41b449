//! Configuration (SPEC §4): one TOML file layered under `CMC_FORWARDER__SECTION__KEY`
//! environment variables, deserialised into typed settings and checked before anything binds.
//!
//! Every key has a default, so the service runs with no file against a local NATS. Unknown
//! keys and invalid values stop start-up with a message naming the key. Secrets live in
//! [`Secret`], which never prints its value. Owns no I/O beyond reading the file.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::subject::{Placeholder, SubjectTemplate};
use crate::webhook::InvalidEntries;

/// The environment prefix; `CMC_FORWARDER__NATS__MODE=core` sets `nats.mode`.
pub const ENV_PREFIX: &str = "CMC_FORWARDER";

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: [&str; 4] = [
    "nats.servers",
    "nats.stream.subjects",
    "auth.allowed_ips",
    "auth.trusted_proxies",
];

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub auth: AuthSettings,
    pub nats: NatsSettings,
    pub spool: SpoolSettings,
    pub validation: ValidationSettings,
    pub inbound: InboundSettings,
    pub cmc: CmcSettings,
    pub log: LogSettings,
    pub telemetry: TelemetrySettings,
}

/// The public webhook listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address and port the webhook listener binds (port 0 picks a free one).
    pub listen: String,
    /// The path CMC posts to; every other path answers 404.
    pub path: String,
    /// Largest accepted body, in bytes; larger ones answer 413 (counted while reading, with or
    /// without `Content-Length`).
    pub max_body_bytes: u64,
    /// Time allowed to receive a whole request.
    pub request_timeout: HumanDuration,
    /// Requests handled at once; beyond it the service answers 503 instead of queueing.
    pub max_in_flight: usize,
    /// Open connections at once; more wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// After SIGTERM/SIGINT: time in-flight requests get before their connections are closed.
    pub shutdown_grace: HumanDuration,
    /// PEM certificate chain for native TLS (with `tls_key_file`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for native TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: "0.0.0.0:8080".into(),
            path: "/webhooks/cmc".into(),
            max_body_bytes: 4 * 1024 * 1024,
            request_timeout: HumanDuration::secs(30),
            max_in_flight: 1024,
            max_connections: 10_000,
            shutdown_grace: HumanDuration::secs(10),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// The admin listener (health, readiness, metrics), kept off the public port.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Address of the admin listener; `""` disables it.
    pub listen: String,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: "127.0.0.1:9091".into(),
        }
    }
}

/// Who may post webhooks.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// When non-empty, the request's `api_key` parameter must match.
    pub api_key: Secret,
    /// When non-empty, HTTP Basic authentication is required.
    pub basic_username: String,
    pub basic_password: Secret,
    /// Client networks (CIDR) allowed to post; empty allows all.
    pub allowed_ips: Vec<String>,
    /// Proxies (CIDR) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
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
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Server URLs; the client reconnects across all of them.
    pub servers: Vec<String>,
    pub mode: Mode,
    /// Subject template; placeholders `{event_type}`, `{status}`, `{status_name}`,
    /// `{server_composition}`.
    pub subject: String,
    /// Time a batch may take to be acknowledged before the request answers 503.
    pub publish_timeout: HumanDuration,
    /// Time allowed for the first connection at start-up before the service starts anyway.
    pub connect_timeout: HumanDuration,
    /// Client name shown in the server's connection list.
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    pub token: Secret,
    pub username: String,
    pub password: Secret,
    pub nkey_seed: Secret,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    pub stream: StreamSettings,
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings {
            servers: vec!["nats://127.0.0.1:4222".into()],
            mode: Mode::Jetstream,
            subject: "cmc.{event_type}.{status}".into(),
            publish_timeout: HumanDuration::secs(5),
            connect_timeout: HumanDuration::secs(5),
            name: "cmc-forwarder".into(),
            creds_file: None,
            token: Secret::default(),
            username: String::new(),
            password: Secret::default(),
            nkey_seed: Secret::default(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            stream: StreamSettings::default(),
        }
    }
}

/// Stream storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    #[default]
    File,
    Memory,
}

/// The JetStream stream the messages are stored in (`jetstream` mode).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    pub name: String,
    /// Create or update the stream at start-up; when false it must already exist.
    pub create: bool,
    /// The stream's subjects; every subject the template can produce must fall under one.
    pub subjects: Vec<String>,
    pub storage: Storage,
    pub replicas: usize,
    /// Age after which messages are discarded; `0s` keeps them forever.
    pub max_age: HumanDuration,
    /// Window in which a repeated `Nats-Msg-Id` is dropped as a duplicate.
    pub duplicate_window: HumanDuration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            name: "CMC_EVENTS".into(),
            create: true,
            subjects: vec!["cmc.>".into()],
            storage: Storage::File,
            replicas: 1,
            max_age: HumanDuration::secs(0),
            duplicate_window: HumanDuration::secs(120),
        }
    }
}

/// The durable local buffer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSettings {
    pub enabled: bool,
    /// Directory of the spool files; relative to the working directory.
    pub dir: PathBuf,
    /// Size at which new batches are refused with 503.
    pub max_bytes: u64,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        SpoolSettings {
            enabled: true,
            dir: "data/spool".into(),
            max_bytes: 1 << 30,
        }
    }
}

/// What happens to invalid entries (SPEC §1 "Validation is all-or-nothing (by default)").
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationSettings {
    /// `reject` (422, nothing published) or `dead_letter` (each invalid entry goes out on
    /// `dead_letter_subject`, the valid ones as usual).
    pub invalid_entries: InvalidEntries,
    /// Subject template of dead letters; placeholders `{event_type}`, `{server_composition}`.
    pub dead_letter_subject: String,
}

impl Default for ValidationSettings {
    fn default() -> Self {
        ValidationSettings {
            invalid_entries: InvalidEntries::Reject,
            dead_letter_subject: "cmc.invalid.{event_type}".into(),
        }
    }
}

/// The Inbound webhook (SPEC §7): received mail, one message per mail.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboundSettings {
    /// Path of the inbound endpoint on the public listener; `""` disables it.
    pub path: String,
    /// Subject template; placeholders `{filter}` and `{server_composition}`.
    pub subject: String,
    /// Largest accepted inbound body, in bytes (attachments included); larger ones answer 413.
    pub max_body_bytes: u64,
    /// JetStream object store holding attachments (stream `OBJ_<bucket>`).
    pub bucket: String,
}

impl Default for InboundSettings {
    fn default() -> Self {
        InboundSettings {
            path: "/webhooks/cmc/inbound".into(),
            subject: "cmc.inbound.{filter}".into(),
            max_body_bytes: 32 * 1024 * 1024,
            bucket: "CMC_INBOUND".into(),
        }
    }
}

/// Export of request spans.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// OTLP/HTTP collector base URL (`http://otel-collector:4318`); spans are POSTed to
    /// `<endpoint>/v1/traces`. Empty: no export.
    pub otlp_endpoint: String,
}

/// Facts about the CMC account.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CmcSettings {
    /// CMC console's time zone (IANA name or `+09:00`); adds `created_at` to bodies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `cmc_forwarder=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// A secret value: deserialised normally, never shown by `Debug` or serialisation.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }

    fn shown(&self) -> &'static str {
        if self.is_set() {
            "[redacted]"
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

/// A duration written with a unit (`500ms`, `5s`, `2m`, `1h`, `1d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn secs(s: u64) -> Self {
        HumanDuration(Duration::from_secs(s))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration with a unit, such as \"500ms\", \"5s\", \"2m\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                humantime::parse_duration(v.trim())
                    .map(HumanDuration)
                    .map_err(|e| E::custom(format!("invalid duration {v:?}: {e}")))
            }
        }
        d.deserialize_str(V)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_zero() {
            s.serialize_str("0s")
        } else {
            s.serialize_str(&humantime::format_duration(self.0).to_string())
        }
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
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        message: message.into(),
    }
}

impl Settings {
    /// Loads the optional TOML file, then the environment: `env` is the process environment
    /// in production and a plain map in tests (never mutate the process environment).
    pub fn load(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Settings, SettingsError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| SettingsError::File {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let mut environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .try_parsing(true)
            .source(env);
        for key in LIST_KEYS {
            environment = environment.with_list_parse_key(key);
        }
        let settings: Settings = builder
            .add_source(environment)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| SettingsError::Parse(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Loads from a TOML string alone (tests and examples).
    pub fn from_toml(text: &str) -> Result<Settings, SettingsError> {
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| SettingsError::Parse(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks everything that serde alone cannot.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.server_listen()?;
        self.admin_listen()?;
        if !self.server.path.starts_with('/') {
            return Err(invalid("server.path", "must start with '/'"));
        }
        if self.server.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be greater than 0"));
        }
        if self.server.max_in_flight == 0 {
            return Err(invalid("server.max_in_flight", "must be greater than 0"));
        }
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be greater than 0"));
        }
        if self.server.request_timeout.get().is_zero() {
            return Err(invalid("server.request_timeout", "must be greater than 0"));
        }
        if self.server.tls_cert_file.is_some() != self.server.tls_key_file.is_some() {
            return Err(invalid(
                "server.tls_cert_file",
                "tls_cert_file and tls_key_file must be set together",
            ));
        }
        if self.nats.servers.iter().all(|s| s.trim().is_empty()) {
            return Err(invalid("nats.servers", "at least one server is required"));
        }
        if self.nats.publish_timeout.get().is_zero() {
            return Err(invalid("nats.publish_timeout", "must be greater than 0"));
        }
        if self.nats.connect_timeout.get().is_zero() {
            return Err(invalid("nats.connect_timeout", "must be greater than 0"));
        }
        if self.nats.tls_cert_file.is_some() != self.nats.tls_key_file.is_some() {
            return Err(invalid(
                "nats.tls_cert_file",
                "tls_cert_file and tls_key_file must be set together",
            ));
        }
        let template = self.subject_template()?;
        let dead_letter = self.dead_letter_template()?;
        if self.nats.mode == Mode::Jetstream {
            let stream = &self.nats.stream;
            if stream.name.is_empty()
                || stream
                    .name
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
            {
                return Err(invalid(
                    "nats.stream.name",
                    format!("{:?} is not a valid stream name", stream.name),
                ));
            }
            if stream.replicas == 0 || stream.replicas > 5 {
                return Err(invalid("nats.stream.replicas", "must be between 1 and 5"));
            }
            let (max_age, window) = (stream.max_age.get(), stream.duplicate_window.get());
            if !max_age.is_zero() && window > max_age {
                // JetStream refuses such a stream; say so before connecting.
                return Err(invalid(
                    "nats.stream.duplicate_window",
                    "must not be longer than nats.stream.max_age",
                ));
            }
            if stream.subjects.is_empty() {
                return Err(invalid("nats.stream.subjects", "at least one is required"));
            }
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
            if let Some(dead_letter) = &dead_letter {
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
        }
        if self.auth.basic_username.is_empty() == self.auth.basic_password.is_set() {
            return Err(invalid(
                "auth.basic_username",
                "basic_username and basic_password must be set together",
            ));
        }
        for (key, list) in [
            ("auth.allowed_ips", &self.auth.allowed_ips),
            ("auth.trusted_proxies", &self.auth.trusted_proxies),
        ] {
            for item in list.iter().filter(|s| !s.trim().is_empty()) {
                crate::auth::parse_cidr(item).map_err(|e| invalid(key, e))?;
            }
        }
        self.timezone()?;
        let endpoint = self.telemetry.otlp_endpoint.trim();
        if !endpoint.is_empty() && !endpoint.starts_with("http://") {
            return Err(invalid(
                "telemetry.otlp_endpoint",
                format!("{endpoint:?} must be an http:// URL of an OTLP/HTTP collector, or empty"),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid("log.level", format!("{:?}: {e}", self.log.level)));
        }
        if self.spool.enabled && self.spool.max_bytes == 0 {
            return Err(invalid("spool.max_bytes", "must be greater than 0"));
        }
        crate::inbound::check_settings(self).map_err(|(key, message)| invalid(key, message))?;
        Ok(())
    }

    /// The CMC console's time zone, when set.
    pub fn timezone(&self) -> Result<Option<jiff::tz::TimeZone>, SettingsError> {
        self.cmc
            .timezone
            .as_deref()
            .filter(|z| !z.trim().is_empty())
            .map(|z| parse_timezone(z).map_err(|e| invalid("cmc.timezone", e)))
            .transpose()
    }

    /// The validated dead-letter subject template, in dead-letter mode. An invalid entry may
    /// have no usable status, so only `{event_type}` and `{server_composition}` may be used.
    pub fn dead_letter_template(&self) -> Result<Option<SubjectTemplate>, SettingsError> {
        if self.validation.invalid_entries != InvalidEntries::DeadLetter {
            return Ok(None);
        }
        let key = "validation.dead_letter_subject";
        let template = SubjectTemplate::parse(&self.validation.dead_letter_subject)
            .map_err(|e| invalid(key, e.to_string()))?;
        if template.uses(Placeholder::Status) || template.uses(Placeholder::StatusName) {
            return Err(invalid(
                key,
                "may use only {event_type} and {server_composition}: an invalid entry has no usable status",
            ));
        }
        Ok(Some(template))
    }

    /// The validated subject template.
    pub fn subject_template(&self) -> Result<SubjectTemplate, SettingsError> {
        SubjectTemplate::parse(&self.nats.subject)
            .map_err(|e| invalid("nats.subject", e.to_string()))
    }

    pub fn server_listen(&self) -> Result<SocketAddr, SettingsError> {
        self.server
            .listen
            .parse()
            .map_err(|e| invalid("server.listen", format!("{:?}: {e}", self.server.listen)))
    }

    /// The admin address, or `None` when disabled.
    pub fn admin_listen(&self) -> Result<Option<SocketAddr>, SettingsError> {
        if self.admin.listen.is_empty() {
            return Ok(None);
        }
        self.admin
            .listen
            .parse()
            .map(Some)
            .map_err(|e| invalid("admin.listen", format!("{:?}: {e}", self.admin.listen)))
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
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
mod tests {
    use super::*;

    #[test]
    fn time_zones_are_validated() {
        assert!(Settings::from_toml("[cmc]\ntimezone = \"Asia/Tokyo\"")
            .unwrap()
            .timezone()
            .unwrap()
            .is_some());
        assert!(Settings::from_toml("[cmc]\ntimezone = \"+09:00\"").is_ok());
        for bad in ["Mars/Olympus", "+9:00", "+25:00", "09:00"] {
            let err = Settings::from_toml(&format!("[cmc]\ntimezone = {bad:?}")).unwrap_err();
            assert!(err.to_string().contains("cmc.timezone"), "{bad}: {err}");
        }
    }

    #[test]
    fn validation_and_telemetry_keys() {
        let s = Settings::from_toml("").unwrap();
        assert_eq!(s.validation.invalid_entries, InvalidEntries::Reject);
        assert_eq!(s.validation.dead_letter_subject, "cmc.invalid.{event_type}");
        assert!(s.dead_letter_template().unwrap().is_none());
        assert_eq!(s.telemetry.otlp_endpoint, "");

        let s = Settings::from_toml("[validation]\ninvalid_entries = \"dead_letter\"").unwrap();
        assert_eq!(
            s.dead_letter_template().unwrap().unwrap().as_str(),
            "cmc.invalid.{event_type}"
        );
        for (bad, key) in [
            ("[validation]\ninvalid_entries = \"drop\"", "invalid_entries"),
            (
                "[validation]\ninvalid_entries = \"dead_letter\"\ndead_letter_subject = \"cmc.bad.{status}\"",
                "validation.dead_letter_subject",
            ),
            (
                "[validation]\ninvalid_entries = \"dead_letter\"\ndead_letter_subject = \"other.{event_type}\"",
                "validation.dead_letter_subject",
            ),
            (
                "[telemetry]\notlp_endpoint = \"collector:4318\"",
                "telemetry.otlp_endpoint",
            ),
        ] {
            let err = Settings::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
        // Core mode has no stream to cover the dead-letter subject.
        assert!(Settings::from_toml(
            "[nats]\nmode = \"core\"\n[validation]\ninvalid_entries = \"dead_letter\"\ndead_letter_subject = \"other.{event_type}\""
        )
        .is_ok());
    }

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_match_the_spec() {
        let s = Settings::load(None, env(&[])).unwrap();
        assert_eq!(s.server.listen, "0.0.0.0:8080");
        assert_eq!(s.server.path, "/webhooks/cmc");
        assert_eq!(s.server.max_body_bytes, 4194304);
        assert_eq!(s.nats.servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(s.nats.mode, Mode::Jetstream);
        assert_eq!(s.nats.publish_timeout.get(), Duration::from_secs(5));
        assert_eq!(s.nats.stream.name, "CMC_EVENTS");
        assert_eq!(
            s.nats.stream.duplicate_window.get(),
            Duration::from_secs(120)
        );
        assert!(s.spool.enabled);
        assert_eq!(
            s.admin_listen().unwrap(),
            Some("127.0.0.1:9091".parse().unwrap())
        );
    }

    #[test]
    fn the_shipped_default_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let s = Settings::load(Some(&path), env(&[])).unwrap();
        assert_eq!(s.nats.subject, "cmc.{event_type}.{status}");
    }

    #[test]
    fn environment_overrides_file_values_including_lists_and_nesting() {
        let s = Settings::load(
            None,
            env(&[
                ("CMC_FORWARDER__NATS__STREAM__NAME", "OTHER"),
                (
                    "CMC_FORWARDER__NATS__SERVERS",
                    "nats://a:4222,nats://b:4222",
                ),
                ("CMC_FORWARDER__NATS__MODE", "core"),
                ("CMC_FORWARDER__SERVER__MAX_BODY_BYTES", "1000"),
                ("CMC_FORWARDER__NATS__PUBLISH_TIMEOUT", "500ms"),
                ("CMC_FORWARDER__AUTH__API_KEY", "12345"),
                ("CMC_FORWARDER__SPOOL__ENABLED", "false"),
                ("CMC_FORWARDER_PORT", "tcp://10.0.0.1:80"),
            ]),
        )
        .unwrap();
        assert_eq!(s.nats.stream.name, "OTHER");
        assert_eq!(s.nats.servers, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(s.nats.mode, Mode::Core);
        assert_eq!(s.server.max_body_bytes, 1000);
        assert_eq!(s.nats.publish_timeout.get(), Duration::from_millis(500));
        assert_eq!(s.auth.api_key.expose(), "12345");
        assert!(!s.spool.enabled);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err =
            Settings::from_toml("[server]\nlisten = \"0.0.0.0:1\"\nlistne = 1\n").unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
        let err = Settings::load(None, env(&[("CMC_FORWARDER__NATS__SUBJCT", "x")])).unwrap_err();
        assert!(err.to_string().contains("subjct"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        for (toml, key) in [
            ("[nats]\nmode = \"fast\"", "mode"),
            ("[nats]\npublish_timeout = \"5 parsecs\"", "publish_timeout"),
            ("[nats]\npublish_timeout = 5", "publish_timeout"),
            ("[server]\nmax_body_bytes = \"big\"", "max_body_bytes"),
            ("[server]\nlisten = \"nowhere\"", "server.listen"),
            ("[server]\npath = \"webhooks\"", "server.path"),
            ("[nats]\nsubject = \"cmc.{nope}\"", "nats.subject"),
            ("[nats]\nsubject = \"cmc.*\"", "nats.subject"),
            ("[nats]\nsubject = \"mail.{status}\"", "nats.subject"),
            ("[nats.stream]\nname = \"a.b\"", "nats.stream.name"),
            ("[auth]\nbasic_username = \"u\"", "auth.basic_username"),
            (
                "[nats.stream]\nmax_age = \"1m\"",
                "nats.stream.duplicate_window",
            ),
        ] {
            let err = Settings::from_toml(toml).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn core_mode_needs_no_covering_stream() {
        assert!(
            Settings::from_toml("[nats]\nmode = \"core\"\nsubject = \"mail.{status}\"").is_ok()
        );
    }

    #[test]
    fn secrets_are_redacted_everywhere() {
        let s = Settings::from_toml(
            "[auth]\napi_key = \"k-123\"\nbasic_username = \"cmc\"\nbasic_password = \"p-456\"\n[nats]\ntoken = \"t-789\"",
        )
        .unwrap();
        let shown = format!("{}\n{:?}", s.to_redacted_toml(), s);
        for secret in ["k-123", "p-456", "t-789"] {
            assert!(!shown.contains(secret), "{secret} leaked");
        }
        assert!(shown.contains("[redacted]"));
        assert_eq!(s.auth.api_key.expose(), "k-123");
    }

    #[test]
    fn redacted_toml_round_trips_durations() {
        let s = Settings::from_toml("[nats]\npublish_timeout = \"1500ms\"").unwrap();
        let again = Settings::from_toml(&s.to_redacted_toml()).unwrap();
        assert_eq!(again.nats.publish_timeout, s.nats.publish_timeout);
        assert_eq!(again.nats.stream.max_age, s.nats.stream.max_age);
    }
}
