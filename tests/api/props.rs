//! Properties of the whole service, each run against one real app and one real nats-server:
//! garbage is always refused without a trace on the bus, and every valid batch comes out as
//! exactly one well-formed message per entry.
//!
//! The property loop is proptest's `TestRunner`, driven from a plain `#[test]` that owns one
//! multi-threaded runtime: the app serves on the runtime's workers while each case blocks on
//! its request. A modest case count keeps it fast; failures are shrunk and reported as usual.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Map, Value};

use crate::helpers::*;
use crate::hostile::{drain_events, stored, urlencode};

/// Cases per property; `PROPTEST_CASES` raises it for a longer soak.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// Runs the property; panics with the minimal failing input when it does not hold.
fn check<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    if let Err(e) = runner().run(&strategy, test) {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// (1) Arbitrary bytes

/// Random bytes, and random text over the alphabet of JSON and form bodies (more likely to get
/// past the first byte of a parser).
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..1024),
        "[{}\\[\\]\":,a-z0-9%&=+ .\\\\_-]{0,300}".prop_map(String::into_bytes),
        prop::collection::vec(
            prop_oneof![
                Just("{"),
                Just("}"),
                Just("["),
                Just("]"),
                Just("\""),
                Just(":"),
                Just(","),
                Just("event_type"),
                Just("server_composition"),
                Just("event"),
                Just("deliveries"),
                Just("status"),
                Just("queued"),
                Just("="),
                Just("&"),
                Just("%7B"),
                Just("%22"),
                Just("null"),
                Just("1"),
                Just("%"),
                Just("\\u0000"),
            ],
            0..60
        )
        .prop_map(|parts| parts.concat().into_bytes()),
    ]
}

#[test]
fn arbitrary_bytes_never_answer_5xx_and_never_publish() {
    let rt = runtime();
    let (nats, app, sub) = rt.block_on(async {
        let nats = NatsServer::start().await;
        let app = spawn_app(&nats).await;
        let sub = app.subscribe(">").await;
        (nats, app, sub)
    });
    let sub = tokio::sync::Mutex::new(sub);

    check((any::<bool>(), garbage()), |(form, body)| {
        rt.block_on(async {
            let content_type = if form { Enc::Form } else { Enc::Json }.content_type();
            let response = app.post(content_type, body).await;
            let status = response.status();
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            prop_assert!(status.is_client_error(), "status {status}, body {answer}");
            prop_assert_eq!(&answer["result"], "error");
            let events = drain_events(&app, &mut *sub.lock().await).await;
            prop_assert!(events.is_empty(), "published on {}", events[0].subject);
            Ok(())
        })
    });

    rt.block_on(async {
        assert_silent(&mut *sub.lock().await).await;
        assert_eq!(stored(&app).await, 0);
        drop(app);
        drop(nats);
    });
}

// ---------------------------------------------------------------------------------------------
// (2) Valid batches

/// How a batch is sent.
#[derive(Debug, Clone, Copy)]
enum Envelope {
    /// JSON with `event` a nested object.
    Json,
    /// JSON with `event` a JSON string (the lenient form).
    JsonString,
    /// Form-urlencoded, fields in the given order.
    Form([usize; 3]),
}

/// An entry's fields, in order.
type Fields = Vec<(String, Value)>;

/// A JSON object with its keys in the given order.
fn object_text(fields: &[(String, Value)]) -> String {
    let members: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), v))
        .collect();
    format!("{{{}}}", members.join(","))
}

#[derive(Debug, Clone)]
struct ValidBatch {
    event_type: &'static str,
    server_composition: String,
    /// Each entry, with its status token (what the subject must show).
    /// Fields in the order they are sent (a plain `Map` would sort them).
    entries: Vec<(Fields, String)>,
    envelope: Envelope,
}

/// A status for `event_type`: its JSON value and its subject token. Mostly the known set, but
/// any non-empty string of at most 128 bytes is valid too (dots, wildcards, control
/// characters, non-ASCII), and must arrive under its escaped token.
fn status(event_type: &'static str) -> BoxedStrategy<(Value, String)> {
    let any_status = any::<String>()
        .prop_filter("a valid status: 1 to 128 bytes", |s| {
            (1..=128).contains(&s.len())
        })
        .prop_map(|s| {
            let token = escape(&s);
            (json!(s), token)
        });
    match event_type {
        "deliveries" => prop_oneof![
            3 => prop::sample::select(&["queued", "succeeded", "failed", "deferred"][..])
                .prop_map(|s| (json!(s), s.to_owned())),
            1 => any_status,
        ]
        .boxed(),
        _ => (
            prop::sample::select(&[1u32, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 99][..]),
            any::<bool>(),
        )
            .prop_map(|(code, as_int)| {
                let value = if as_int {
                    json!(code)
                } else {
                    json!(code.to_string())
                };
                (value, code.to_string())
            })
            .boxed(),
    }
}

fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<String>().prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
        prop::collection::vec(any::<String>().prop_map(Value::from), 0..3).prop_map(Value::from),
    ]
}

fn entry(event_type: &'static str) -> impl Strategy<Value = (Fields, String)> {
    (
        status(event_type),
        prop::collection::vec(
            (
                "[a-zA-Z][a-zA-Z0-9_]{0,11}".prop_filter("not an added or status field", |k| {
                    !["status", "event_type", "server_composition"].contains(&k.as_str())
                }),
                field_value(),
            ),
            0..6,
        ),
        any::<prop::sample::Index>(),
    )
        .prop_map(|((status, token), extras, at)| {
            let mut fields: Vec<(String, Value)> = Vec::new();
            for (k, v) in extras {
                if !fields.iter().any(|(key, _)| *key == k) {
                    fields.push((k, v));
                }
            }
            // The status anywhere among the fields.
            fields.insert(at.index(fields.len() + 1), ("status".into(), status));
            (fields, token)
        })
}

fn valid_batch() -> impl Strategy<Value = ValidBatch> {
    prop::sample::select(&["deliveries", "bounces"][..]).prop_flat_map(|event_type| {
        (
            prop_oneof![
                "[a-z]{1,8}",
                "\\PC{1,12}",
                any::<String>().prop_filter("non-empty", |s| !s.is_empty()),
            ],
            prop::collection::vec(entry(event_type), 0..30),
            prop_oneof![
                Just(Envelope::Json),
                Just(Envelope::JsonString),
                Just([0, 1, 2])
                    .prop_shuffle()
                    .prop_map(|order| { Envelope::Form([order[0], order[1], order[2]]) }),
            ],
        )
            .prop_map(move |(server_composition, entries, envelope)| ValidBatch {
                event_type,
                server_composition,
                entries,
                envelope,
            })
    })
}

impl ValidBatch {
    /// The `event` object, as JSON text with every entry's fields in order.
    fn event(&self) -> String {
        let entries: Vec<String> = self
            .entries
            .iter()
            .map(|(fields, _)| object_text(fields))
            .collect();
        format!(
            "{{{}:[{}]}}",
            Value::from(self.event_type),
            entries.join(",")
        )
    }

    /// Content type and body.
    fn request(&self) -> (&'static str, String) {
        let event = self.event();
        match self.envelope {
            Envelope::Json | Envelope::JsonString => {
                let event = match self.envelope {
                    Envelope::Json => event,
                    _ => Value::from(event).to_string(),
                };
                let body = format!(
                    "{{\"event_type\":{},\"server_composition\":{},\"event\":{}}}",
                    Value::from(self.event_type),
                    Value::from(self.server_composition.as_str()),
                    event
                );
                (Enc::Json.content_type(), body)
            }
            Envelope::Form(order) => {
                let fields = [
                    ("event_type", self.event_type.to_owned()),
                    ("server_composition", self.server_composition.clone()),
                    ("event", event),
                ];
                let body = order
                    .iter()
                    .map(|&i| format!("{}={}", fields[i].0, urlencode(&fields[i].1)))
                    .collect::<Vec<_>>()
                    .join("&");
                (Enc::Form.content_type(), body)
            }
        }
    }
}

/// The subject-token escaping of SPEC §2, written independently of the service's.
fn escape(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn is_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'%' | b'-'))
}

#[test]
fn every_valid_batch_becomes_one_well_formed_message_per_entry() {
    let rt = runtime();
    let (nats, app, sub) = rt.block_on(async {
        let nats = NatsServer::start().await;
        let mut settings = test_settings(&nats);
        settings.nats.subject = "cmc.{server_composition}.{event_type}.{status}"
            .parse()
            .unwrap();
        let app = spawn_app_with(settings).await;
        let sub = app.subscribe(">").await;
        (nats, app, sub)
    });
    let sub = tokio::sync::Mutex::new(sub);

    check(valid_batch(), |batch| {
        rt.block_on(async {
            let (content_type, body) = batch.request();
            let response = app.post(content_type, body).await;
            let status = response.status();
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            // SPEC §1: an entry whose subject would exceed 512 bytes is invalid, and the
            // request with it (all-or-nothing).
            let prefix = format!(
                "cmc.{}.{}.",
                escape(&batch.server_composition),
                batch.event_type
            );
            let too_long = batch
                .entries
                .iter()
                .position(|(_, token)| prefix.len() + token.len() > 512);
            if let Some(index) = too_long {
                prop_assert_eq!(status, 422, "{}", answer);
                prop_assert_eq!(&answer["index"], index);
                let events = drain_events(&app, &mut *sub.lock().await).await;
                prop_assert!(events.is_empty(), "published on {}", events[0].subject);
                return Ok(());
            }
            prop_assert_eq!(status, 200, "{}", answer);
            prop_assert_eq!(&answer["result"], "ok");
            prop_assert_eq!(&answer["published"], batch.entries.len());

            let events = drain_events(&app, &mut *sub.lock().await).await;
            prop_assert_eq!(events.len(), batch.entries.len());
            for (i, (message, (fields, token))) in events.iter().zip(&batch.entries).enumerate() {
                let subject = message.subject.as_str();
                let tokens: Vec<&str> = subject.split('.').collect();
                prop_assert_eq!(tokens.len(), 4, "{}", subject);
                prop_assert!(tokens.iter().all(|t| is_token(t)), "{}", subject);
                let expected = format!(
                    "cmc.{}.{}.{}",
                    escape(&batch.server_composition),
                    batch.event_type,
                    token
                );
                prop_assert_eq!(subject, expected.as_str());

                let headers = message.headers.as_ref().expect("headers");
                prop_assert_eq!(header(headers, "Cmc-Batch-Index"), i.to_string());
                // Raw when printable ASCII without leading or trailing space, else escaped.
                let status = fields
                    .iter()
                    .find(|(k, _)| k == "status")
                    .map(|(_, v)| v)
                    .expect("a status field");
                let raw = match status {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let printable = raw.bytes().all(|b| (0x20..=0x7e).contains(&b))
                    && !raw.starts_with(' ')
                    && !raw.ends_with(' ');
                let expected_header = if printable { raw } else { escape(&raw) };
                prop_assert_eq!(header(headers, "Cmc-Status"), expected_header);

                let body: Map<String, Value> = serde_json::from_slice(&message.payload)
                    .map_err(|e| TestCaseError::fail(format!("body is not an object: {e}")))?;
                let keys = ordered_keys(&message.payload);
                let mut expected_keys = vec!["event_type", "server_composition"];
                expected_keys.extend(fields.iter().map(|(k, _)| k.as_str()));
                prop_assert_eq!(keys, expected_keys);
                prop_assert_eq!(&body["event_type"], batch.event_type);
                prop_assert_eq!(
                    &body["server_composition"],
                    batch.server_composition.as_str()
                );
                for (k, v) in fields {
                    prop_assert_eq!(&body[k], v, "field {}", k);
                }
            }
            Ok(())
        })
    });

    rt.block_on(async {
        assert_silent(&mut *sub.lock().await).await;
        drop(app);
        drop(nats);
    });
}
