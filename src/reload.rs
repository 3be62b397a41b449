//! Configuration reload (on SIGHUP): the file and the environment are read again, and the
//! settings that can change while serving take effect for the next request: `[auth]`, the
//! request limits and timeout (`server.max_body_bytes`, `server.max_entries`,
//! `server.max_in_flight`, `server.request_timeout`, `inbound.max_body_bytes`) and
//! `log.level`. Every other setting (listen addresses, NATS, the stream, the spool, …) needs a
//! restart: a change to one is logged by key, counted as `restart_needed`, and left as it was.
//! An invalid configuration changes nothing: its error, naming the key, is logged and counted.
//!
//! Owns the plan of a reload (pure: which keys changed, which of them need a restart) and
//! putting it into force; the listeners, the NATS connection and the spool are never touched,
//! and a request already admitted keeps the settings it was admitted under.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::metrics;
use crate::routes::Gate;
use crate::server::RequestTimeout;
use crate::settings::{Settings, SettingsError};
use crate::shutdown::Hangups;
use crate::telemetry::{self, LevelChange};

/// The keys a reload puts into force, as [`Plan::live`] names them.
pub const LIVE_KEYS: [&str; 7] = [
    "auth",
    "server.max_body_bytes",
    "server.max_entries",
    "server.max_in_flight",
    "server.request_timeout",
    "inbound.max_body_bytes",
    "log.level",
];

/// What a new configuration changes against the running one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Changed keys of [`LIVE_KEYS`], put into force.
    pub live: Vec<&'static str>,
    /// Changed keys that need a restart (dotted, as in the file; a section's name when only a
    /// secret in it changed), left as they are.
    pub restart: Vec<String>,
}

impl Plan {
    /// Compares the running settings with newly loaded ones.
    pub fn of(running: &Settings, new: &Settings) -> Plan {
        let (a, b) = (running, new);
        let changed = [
            a.auth != b.auth,
            a.server.max_body_bytes != b.server.max_body_bytes,
            a.server.max_entries != b.server.max_entries,
            a.server.max_in_flight != b.server.max_in_flight,
            a.server.request_timeout != b.server.request_timeout,
            a.inbound.max_body_bytes != b.inbound.max_body_bytes,
            a.log.level != b.log.level,
        ];
        let live = LIVE_KEYS
            .iter()
            .zip(changed)
            .filter(|(_, changed)| *changed)
            .map(|(key, _)| *key)
            .collect();
        Plan {
            live,
            restart: restart_keys(running, &with_live(new, running)),
        }
    }

    /// The outcome's `result` label: `ok`, or `restart_needed` when a setting could not be
    /// applied.
    pub fn result(&self) -> &'static str {
        if self.restart.is_empty() {
            "ok"
        } else {
            "restart_needed"
        }
    }
}

/// `settings` with the live keys of `from`.
pub fn with_live(settings: &Settings, from: &Settings) -> Settings {
    let mut s = settings.clone();
    s.auth = from.auth.clone();
    s.server.max_body_bytes = from.server.max_body_bytes;
    s.server.max_entries = from.server.max_entries;
    s.server.max_in_flight = from.server.max_in_flight;
    s.server.request_timeout = from.server.request_timeout;
    s.inbound.max_body_bytes = from.inbound.max_body_bytes;
    s.log.level = from.log.level.clone();
    s
}

/// The keys in which `a` and `b` differ, named from their printed (redacted) form; a
/// secret's change does not show there, so a section that differs with no key showing is
/// named whole.
fn restart_keys(a: &Settings, b: &Settings) -> Vec<String> {
    if a == b {
        return Vec::new();
    }
    let table = |s: &Settings| toml::Table::try_from(s).unwrap_or_default();
    let mut keys = Vec::new();
    diff("", &table(a), &table(b), &mut keys);
    if keys.is_empty() {
        let sections = [
            ("server", a.server != b.server),
            ("admin", a.admin != b.admin),
            ("nats", a.nats != b.nats),
            ("spool", a.spool != b.spool),
            ("validation", a.validation != b.validation),
            ("inbound", a.inbound != b.inbound),
            ("cmc", a.cmc != b.cmc),
            ("log", a.log != b.log),
            ("telemetry", a.telemetry != b.telemetry),
        ];
        keys.extend(
            sections
                .iter()
                .filter(|(_, differs)| *differs)
                .map(|(name, _)| name.to_string()),
        );
    }
    keys
}

fn diff(prefix: &str, a: &toml::Table, b: &toml::Table, out: &mut Vec<String>) {
    let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match (a.get(name), b.get(name)) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => diff(&key, x, y, out),
            (x, y) if x != y => out.push(key),
            _ => {}
        }
    }
}

/// How a reload ended.
#[derive(Debug)]
pub enum Outcome {
    /// The new configuration is in force, except for [`Plan::restart`].
    Reloaded(Plan),
    /// The configuration cannot be used; nothing changed.
    Invalid(SettingsError),
}

impl Outcome {
    /// The `result` label of `cmc_forwarder_config_reloads_total`.
    pub fn result(&self) -> &'static str {
        match self {
            Outcome::Reloaded(plan) => plan.result(),
            Outcome::Invalid(_) => "error",
        }
    }
}

/// Reloads one application's configuration; cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<Inner>,
}

struct Inner {
    /// `--config`; `None`: the environment alone.
    file: Option<PathBuf>,
    /// The settings in force: those of start-up with the live keys of the last good reload.
    /// Held for the whole of a reload, so two reloads never interleave.
    running: Mutex<Settings>,
    gate: Gate,
    request_timeout: RequestTimeout,
}

impl Reloader {
    pub fn new(
        file: Option<PathBuf>,
        running: Settings,
        gate: Gate,
        request_timeout: RequestTimeout,
    ) -> Reloader {
        Reloader {
            inner: Arc::new(Inner {
                file,
                running: Mutex::new(running),
                gate,
                request_timeout,
            }),
        }
    }

    /// Reads the file and the process environment again and applies the result (blocking:
    /// reads a file).
    pub fn reload(&self) -> Outcome {
        self.apply(Settings::load(self.inner.file.as_deref(), None))
    }

    /// Puts `loaded` into force as far as it can change live; logs and counts the outcome.
    pub fn apply(&self, loaded: Result<Settings, SettingsError>) -> Outcome {
        let outcome = match loaded {
            Ok(new) => Outcome::Reloaded(self.put_in_force(&new)),
            Err(error) => {
                tracing::error!(
                    error = %error,
                    "configuration not reloaded: it is invalid, and the running one stays in force"
                );
                Outcome::Invalid(error)
            }
        };
        metrics::config_reload(outcome.result());
        outcome
    }

    fn put_in_force(&self, new: &Settings) -> Plan {
        let inner = &self.inner;
        let mut running = inner.running.lock().unwrap_or_else(|e| e.into_inner());
        let plan = Plan::of(&running, new);
        if plan
            .live
            .iter()
            .any(|k| *k != "log.level" && *k != "server.request_timeout")
        {
            inner.gate.replace(new);
        }
        if plan.live.contains(&"server.request_timeout") {
            inner.request_timeout.set(new.server.request_timeout);
        }
        if plan.live.contains(&"log.level") {
            match telemetry::set_log_level(&new.log.level) {
                LevelChange::Applied | LevelChange::NotInstalled => {}
                LevelChange::OverriddenByEnv => tracing::warn!(
                    "log.level changed, but RUST_LOG is set and stays in force until a restart"
                ),
            }
        }
        *running = with_live(&running, new);
        let policy = inner.gate.policy();
        if plan.restart.is_empty() {
            tracing::info!(
                changed = ?plan.live,
                api_keys = policy.auth.api_keys(),
                basic_users = policy.auth.basic_users(),
                "configuration reloaded"
            );
        } else {
            tracing::warn!(
                changed = ?plan.live,
                needs_restart = ?plan.restart,
                api_keys = policy.auth.api_keys(),
                basic_users = policy.auth.basic_users(),
                "configuration reloaded, except for settings that need a restart: they keep their running values"
            );
        }
        plan
    }
}

/// Reloads the configuration on every SIGHUP, for as long as the process runs.
pub async fn on_hangup(mut hangups: Hangups, reloader: Reloader) {
    while hangups.next().await {
        tracing::info!("SIGHUP received, reloading the configuration");
        let reloader = reloader.clone();
        // Reading the file is blocking I/O.
        if let Err(e) = tokio::task::spawn_blocking(move || reloader.reload()).await {
            tracing::error!(error = %e, "the configuration reload did not finish");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> Settings {
        Settings::from_toml(toml).unwrap()
    }

    #[test]
    fn an_unchanged_configuration_changes_nothing() {
        let s = settings("[auth]\napi_key = \"a\"");
        let plan = Plan::of(&s, &s.clone());
        assert_eq!(plan, Plan::default());
        assert_eq!(plan.result(), "ok");
    }

    #[test]
    fn live_keys_are_applied_and_named() {
        let running = settings("[auth]\napi_key = \"a\"");
        let new = settings(
            "[auth]\napi_key = [\"a\", \"b\"]\n[server]\nmax_body_bytes = 10\nrequest_timeout = \"3s\"\n[log]\nlevel = \"debug\"",
        );
        let plan = Plan::of(&running, &new);
        assert_eq!(
            plan.live,
            [
                "auth",
                "server.max_body_bytes",
                "server.request_timeout",
                "log.level"
            ]
        );
        assert!(plan.restart.is_empty(), "{plan:?}");
        assert_eq!(plan.result(), "ok");
        assert_eq!(with_live(&running, &new), new);
    }

    #[test]
    fn settings_that_need_a_restart_are_named_and_kept() {
        let running = settings("[server]\nlisten = \"127.0.0.1:8080\"");
        let new = settings(
            "[server]\nlisten = \"127.0.0.1:8081\"\nmax_entries = 5\n[nats]\nservers = [\"nats://b:4222\"]\n[nats.stream]\nname = \"OTHER\"\n[spool]\ndir = \"elsewhere\"",
        );
        let plan = Plan::of(&running, &new);
        assert_eq!(plan.live, ["server.max_entries"]);
        assert_eq!(
            plan.restart,
            [
                "nats.servers",
                "nats.stream.name",
                "server.listen",
                "spool.dir"
            ]
        );
        assert_eq!(plan.result(), "restart_needed");
        // What stays in force: the running listen address, the new limit.
        let kept = with_live(&running, &new);
        assert_eq!(kept.server.listen, running.server.listen);
        assert_eq!(kept.server.max_entries, 5);
        assert_eq!(kept.nats.servers, running.nats.servers);
    }

    #[test]
    fn a_changed_secret_is_named_by_its_section_never_by_its_value() {
        let running = settings("[nats]\nusername = \"u\"\npassword = \"old-secret\"");
        let new = settings("[nats]\nusername = \"u\"\npassword = \"new-secret\"");
        let plan = Plan::of(&running, &new);
        assert_eq!(plan.restart, ["nats"]);
        let shown = format!("{plan:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
