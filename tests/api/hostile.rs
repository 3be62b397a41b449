//! Hostile input (issue 3): every way a request can be wrong, table-driven. Each refusal must
//! carry its SPEC §3 status and `error` code (README "Choices" where the SPEC is silent), and
//! nothing of it may reach the bus: no event on a subscription to `>` and nothing stored in
//! the stream. The valid edge cases in the tables (charset parameters, query strings, limits
//! met exactly, …) assert their messages instead.
//!
//! One app per test function; each table runs in order and fails with the name of every case
//! that went wrong, not just the first.

use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{stream, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

const J: &str = "application/json";
const F: &str = "application/x-www-form-urlencoded";

/// One request and what must come of it.
struct Case {
    name: String,
    method: Method,
    /// Path and query; `None` is the webhook path.
    path: Option<String>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    /// Sent without `Content-Length`, in chunks.
    chunked: bool,
    headers: Vec<(&'static str, String)>,
    basic: Option<(&'static str, &'static str)>,
    status: u16,
    /// The `error` code of a refusal; unused for a `200`.
    code: &'static str,
    /// The `index` of the entry at fault, when one is.
    index: Option<usize>,
    /// A response header that must be present with this value.
    response_header: Option<(&'static str, &'static str)>,
    /// For a `200`: the subjects of the messages, in order.
    subjects: Vec<String>,
}

/// A request that must be refused with `status` and `code`.
fn case(
    name: impl Into<String>,
    content_type: Option<&'static str>,
    body: impl Into<Vec<u8>>,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        name: name.into(),
        method: Method::POST,
        path: None,
        content_type,
        body: body.into(),
        chunked: false,
        headers: Vec::new(),
        basic: None,
        status,
        code,
        index: None,
        response_header: None,
        subjects: Vec::new(),
    }
}

/// A JSON request refused with `status` and `code`.
fn j(name: impl Into<String>, body: impl Into<Vec<u8>>, status: u16, code: &'static str) -> Case {
    case(name, Some(J), body, status, code)
}

/// A form request refused with `status` and `code`.
fn f(name: impl Into<String>, body: impl Into<Vec<u8>>, status: u16, code: &'static str) -> Case {
    case(name, Some(F), body, status, code)
}

/// A JSON request refused with `422 invalid_payload`.
fn invalid(name: impl Into<String>, body: impl Into<Vec<u8>>) -> Case {
    j(name, body, 422, "invalid_payload")
}

/// A request that must be accepted, publishing one message per subject, in order.
fn accepted(
    name: impl Into<String>,
    content_type: Option<&'static str>,
    body: impl Into<Vec<u8>>,
    subjects: &[&str],
) -> Case {
    let mut c = case(name, content_type, body, 200, "");
    c.subjects = subjects.iter().map(|s| s.to_string()).collect();
    c
}

impl Case {
    fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    fn method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }

    fn path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn basic(mut self, user: &'static str, password: &'static str) -> Self {
        self.basic = Some((user, password));
        self
    }

    fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }

    fn expect_header(mut self, name: &'static str, value: &'static str) -> Self {
        self.response_header = Some((name, value));
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies

/// A JSON webhook from the raw JSON texts of its three parameters.
fn batch(event_type: &str, server_composition: &str, event: &str) -> String {
    format!(
        r#"{{"event_type":{event_type},"server_composition":{server_composition},"event":{event}}}"#
    )
}

/// A `deliveries` JSON webhook of server `pro` with the given entries array (raw JSON).
fn deliveries(entries: &str) -> String {
    batch(
        r#""deliveries""#,
        r#""pro""#,
        &format!(r#"{{"deliveries":{entries}}}"#),
    )
}

/// An entries array of four valid entries with `bad` in the middle, at index 2.
fn middle(bad: &str) -> String {
    format!(
        r#"[{{"status":"queued"}},{{"status":"succeeded","to":"a@example.com"}},{bad},{{"status":"failed"}},{{"status":"deferred"}}]"#
    )
}

/// A `deliveries` webhook whose entry at index 1 has the raw JSON `status`.
fn with_status(status: &str) -> String {
    deliveries(&format!(
        r#"[{{"status":"queued"}},{{"to":"a@example.com","status":{status}}},{{"status":"failed"}}]"#
    ))
}

/// The `event` of one valid `deliveries` entry.
const ONE: &str = r#"{"deliveries":[{"status":"queued"}]}"#;

/// The valid one-entry JSON webhook.
fn valid_json() -> String {
    deliveries(r#"[{"status":"queued"}]"#)
}

/// Form-urlencodes `s` (space as `+`).
pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                (b as char).to_string()
            }
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A form body of the given fields, in order, names and values encoded.
fn form(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The valid one-entry form webhook.
fn valid_form() -> String {
    form(&[
        ("event_type", "deliveries"),
        ("server_composition", "pro"),
        ("event", ONE),
    ])
}

// ---------------------------------------------------------------------------------------------
// The runner

/// Whether a message is NATS control traffic rather than an event (as in `helpers`).
fn is_control(message: &async_nats::Message) -> bool {
    let subject = message.subject.as_str();
    subject.starts_with("_INBOX.") || subject.starts_with("$JS.")
}

/// The event messages that reached `sub` so far. Exact, with no fixed wait: a marker message
/// is published on this connection, and whatever the service published before it answered was
/// processed by the server before the marker, so it reaches `sub` before the marker does. (A
/// flush alone is no barrier: the client's flush only writes its buffer, it does not wait for
/// the server.)
pub(crate) async fn drain_events(
    app: &TestApp,
    sub: &mut async_nats::Subscriber,
) -> Vec<async_nats::Message> {
    static BARRIERS: AtomicU64 = AtomicU64::new(0);
    let marker = format!("_BARRIER.{}", BARRIERS.fetch_add(1, Ordering::Relaxed));
    app.nats
        .publish(marker.clone(), bytes::Bytes::new())
        .await
        .unwrap();
    app.nats.flush().await.unwrap();
    let mut out = Vec::new();
    loop {
        let message = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("the barrier message arrives")
            .expect("subscription open");
        if message.subject.as_str() == marker {
            return out;
        }
        if !is_control(&message) {
            out.push(message);
        }
    }
}

/// How many messages the stream holds.
pub(crate) async fn stored(app: &TestApp) -> u64 {
    let stream = app
        .jetstream()
        .get_stream(&app.settings.nats.stream.name)
        .await
        .unwrap();
    stream.get_info().await.unwrap().state.messages
}

async fn send(app: &TestApp, c: &Case) -> reqwest::Response {
    let url = match &c.path {
        Some(path) => format!("{}{path}", app.address),
        None => app.webhook_url(),
    };
    let mut request = app.http.request(c.method.clone(), url);
    if let Some(ct) = c.content_type {
        request = request.header("content-type", ct);
    }
    for (name, value) in &c.headers {
        request = request.header(*name, value.as_str());
    }
    if let Some((user, password)) = c.basic {
        request = request.basic_auth(user, Some(password));
    }
    request = if c.chunked {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            c.body.chunks(1000).map(|c| Ok(c.to_vec())).collect();
        request.body(reqwest::Body::wrap_stream(stream::iter(chunks)))
    } else {
        request.body(c.body.clone())
    };
    request.send().await.expect("request sent")
}

/// Runs one case; the problems found, if any.
async fn check(app: &TestApp, sub: &mut async_nats::Subscriber, c: &Case) -> Vec<String> {
    let mut problems = Vec::new();
    let before = stored(app).await;
    let response = send(app, c).await;
    let status = response.status().as_u16();
    if status != c.status {
        problems.push(format!("status {status}, expected {}", c.status));
    }
    if let Some((name, value)) = c.response_header {
        let got = response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("?"));
        if got != Some(value) {
            problems.push(format!("header {name}: {got:?}, expected {value:?}"));
        }
    }
    let body: Value = match response.json().await {
        Ok(body) => body,
        Err(e) => {
            problems.push(format!("the body is not JSON: {e}"));
            Value::Null
        }
    };
    let events = drain_events(app, sub).await;
    let added = stored(app).await - before;
    if c.status == 200 {
        // A body repeated from an earlier case is published again but stored once.
        let expected = c.subjects.len();
        let duplicates = body["duplicates"].as_u64().unwrap_or(0);
        if body["result"] != "ok" || body["published"] != expected {
            problems.push(format!("body {body}, expected published {expected}"));
        }
        let subjects: Vec<&str> = events.iter().map(|m| m.subject.as_str()).collect();
        if subjects != c.subjects {
            problems.push(format!("subjects {subjects:?}, expected {:?}", c.subjects));
        }
        for (i, message) in events.iter().enumerate() {
            let headers = message.headers.as_ref().expect("headers");
            if header(headers, "Cmc-Batch-Index") != i.to_string() {
                problems.push(format!("message {i} has the wrong Cmc-Batch-Index"));
            }
        }
        if added + duplicates != expected as u64 {
            problems.push(format!(
                "{added} messages stored + {duplicates} duplicates, expected {expected}"
            ));
        }
    } else {
        if body["result"] != "error" || body["error"] != c.code {
            problems.push(format!("body {body}, expected error {:?}", c.code));
        }
        if body["message"].as_str().is_none_or(str::is_empty) {
            problems.push(format!("no message in {body}"));
        }
        let expected_index = c.index.map_or(Value::Null, |i| json!(i));
        if body["index"] != expected_index {
            problems.push(format!(
                "index {}, expected {expected_index}",
                body["index"]
            ));
        }
        if !events.is_empty() {
            let subjects: Vec<&str> = events.iter().map(|m| m.subject.as_str()).collect();
            problems.push(format!("PUBLISHED {subjects:?}"));
        }
        if added != 0 {
            problems.push(format!("{added} messages STORED"));
        }
    }
    problems
}

/// Runs every case against one app, then a quiet period on `>`; fails with the list of every
/// case that went wrong, by name.
async fn run(app: &TestApp, cases: Vec<Case>) {
    let mut sub = app.subscribe(">").await;
    let mut failures = Vec::new();
    let mut names = std::collections::HashSet::new();
    for c in &cases {
        assert!(names.insert(c.name.as_str()), "duplicate case {:?}", c.name);
        let problems = check(app, &mut sub, c).await;
        if !problems.is_empty() {
            failures.push(format!("  {}: {}", c.name, problems.join("; ")));
        }
    }
    assert_silent(&mut sub).await;
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The batteries

#[tokio::test]
async fn media_types_and_the_json_envelope() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let ok = ["cmc.deliveries.queued"];
    let valid = valid_json();
    let nested = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let mut bad_utf8 = deliveries(r#"[{"status":"queued","subject":"caf@"}]"#).into_bytes();
    let at = bad_utf8.iter().position(|&b| b == b'@').unwrap();
    bad_utf8[at] = 0xff;
    let mut bad_utf8_key = valid.clone().into_bytes();
    bad_utf8_key.splice(1..1, b"\"\xc3\x28\":1,".iter().copied());
    #[rustfmt::skip]
    let cases = vec![
        // Content-Type
        case("no Content-Type", None, valid.clone(), 415, "unsupported_media_type"),
        case("text/plain", Some("text/plain"), valid.clone(), 415, "unsupported_media_type"),
        case("application/xml", Some("application/xml"), valid.clone(), 415, "unsupported_media_type"),
        case("multipart/form-data", Some("multipart/form-data; boundary=x"), valid.clone(), 415, "unsupported_media_type"),
        case("empty Content-Type", Some(""), valid.clone(), 415, "unsupported_media_type"),
        case("application/jsonx", Some("application/jsonx"), valid.clone(), 415, "unsupported_media_type"),
        case("charset but no media type", Some("; charset=utf-8"), valid.clone(), 415, "unsupported_media_type"),
        case("non-ASCII Content-Type", Some("application/jsön"), valid.clone(), 415, "unsupported_media_type"),
        // Parameters are ignored
        accepted("json; charset=UTF-8", Some("application/json; charset=UTF-8"), valid.clone(), &ok),
        accepted("json;charset=utf-8", Some("application/json;charset=utf-8"), valid.clone(), &ok),
        accepted("JSON upper case", Some("APPLICATION/JSON"), valid.clone(), &ok),
        accepted("json with two parameters", Some("application/json ; charset=\"utf-8\"; x=y"), valid.clone(), &ok),
        accepted("form; charset=UTF-8", Some("application/x-www-form-urlencoded; charset=UTF-8"), valid_form(), &ok),
        accepted("form mixed case", Some("Application/X-WWW-Form-Urlencoded"), valid_form(), &ok),
        // Not JSON
        j("empty JSON body", "", 400, "malformed_json"),
        j("whitespace JSON body", " \r\n\t ", 400, "malformed_json"),
        j("truncated JSON", &valid[..valid.len() / 2], 400, "malformed_json"),
        j("JSON missing its last brace", &valid[..valid.len() - 1], 400, "malformed_json"),
        j("trailing garbage after the object", format!("{valid}x"), 400, "malformed_json"),
        j("two objects", format!("{valid}{valid}"), 400, "malformed_json"),
        j("single quotes", valid.replace('"', "'"), 400, "malformed_json"),
        j("trailing comma", valid.replace("}]}}", "},]}}"), 400, "malformed_json"),
        j("a form body sent as JSON", valid_form(), 400, "malformed_json"),
        j("invalid UTF-8 in an entry value", bad_utf8, 400, "malformed_json"),
        j("invalid UTF-8 in a top-level key", bad_utf8_key, 400, "malformed_json"),
        j("lone surrogate escape in an entry", deliveries(r#"[{"status":"queued","x":"\ud800"}]"#), 400, "malformed_json"),
        j("200 nested arrays in an entry field", deliveries(&format!(r#"[{{"status":"queued","x":{nested}}}]"#)), 400, "malformed_json"),
        // Valid JSON, not an object (README: 422, it parses but is not a webhook)
        invalid("top-level empty array", "[]"),
        invalid("top-level array holding the webhook", format!("[{valid}]")),
        invalid("top-level number", "42"),
        invalid("top-level string", r#""deliveries""#),
        invalid("top-level null", "null"),
        invalid("top-level true", "true"),
        // Duplicate keys
        j("duplicate event_type", format!(r#"{{"event_type":"bounces",{}"#, &valid[1..]), 400, "malformed_json"),
        j("duplicate event", format!(r#"{{"event":{{"deliveries":[]}},{}"#, &valid[1..]), 400, "malformed_json"),
        j("duplicate server_composition", format!(r#"{{"server_composition":"pro",{}"#, &valid[1..]), 400, "malformed_json"),
        j("duplicate api_key", format!(r#"{{"api_key":"a","api_key":"b",{}"#, &valid[1..]), 400, "malformed_json"),
        j("duplicate unknown top-level key", format!(r#"{{"x":1,"x":1,{}"#, &valid[1..]), 400, "malformed_json"),
        j("duplicate array in event", batch(r#""deliveries""#, r#""pro""#, r#"{"deliveries":[],"deliveries":[{"status":"queued"}]}"#), 400, "malformed_json"),
        j("duplicate other key in event", batch(r#""deliveries""#, r#""pro""#, r#"{"deliveries":[],"x":1,"x":2}"#), 400, "malformed_json"),
        j("duplicate key in a string event", batch(r#""deliveries""#, r#""pro""#, r#""{\"deliveries\":[],\"deliveries\":[]}""#), 400, "malformed_json"),
    ];
    run(&app, cases).await;
}

#[tokio::test]
async fn event_type_server_composition_and_event() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let with_type = |et: &str| {
        let key = serde_json::to_string(et).unwrap();
        batch(
            &key,
            r#""pro""#,
            &format!(r#"{{{key}:[{{"status":"queued"}}]}}"#),
        )
    };
    let event = |e: &str| batch(r#""deliveries""#, r#""pro""#, e);
    let sc = |s: &str| batch(r#""deliveries""#, s, ONE);
    let long = "a".repeat(64);
    let long_subject = format!("cmc.{long}.queued");
    #[rustfmt::skip]
    let cases = vec![
        // event_type
        invalid("event_type missing", format!(r#"{{"server_composition":"pro","event":{ONE}}}"#)),
        invalid("event_type number", batch("1", r#""pro""#, ONE)),
        invalid("event_type null", batch("null", r#""pro""#, ONE)),
        invalid("event_type true", batch("true", r#""pro""#, ONE)),
        invalid("event_type array", batch(r#"["deliveries"]"#, r#""pro""#, ONE)),
        invalid("event_type object", batch(r#"{"deliveries":1}"#, r#""pro""#, ONE)),
        invalid("event_type empty", with_type("")),
        invalid("event_type with a dot", with_type("deliveries.x")),
        invalid("event_type *", with_type("*")),
        invalid("event_type >", with_type(">")),
        invalid("event_type with a space", with_type("deli veries")),
        invalid("event_type with a leading space", with_type(" deliveries")),
        invalid("event_type with a newline", with_type("deliveries\n")),
        invalid("event_type with NUL", with_type("deliveries\u{0}")),
        invalid("event_type with a hyphen", with_type("de-liveries")),
        invalid("event_type of 65 characters", with_type(&"a".repeat(65))),
        invalid("event_type capitalised", with_type("Deliveries")),
        invalid("event_type upper case", with_type("DELIVERIES")),
        invalid("event_type Japanese", with_type("配信")),
        invalid("event_type not the key in event", batch(r#""bounces""#, r#""pro""#, ONE)),
        invalid("event key differs in case", batch(r#""deliveries""#, r#""pro""#, r#"{"Deliveries":[{"status":"queued"}]}"#)),
        accepted("event_type of 64 characters", Some(J), with_type(&long), &[&long_subject]),
        // server_composition
        invalid("server_composition missing", format!(r#"{{"event_type":"deliveries","event":{ONE}}}"#)),
        invalid("server_composition number", sc("1")),
        invalid("server_composition null", sc("null")),
        invalid("server_composition false", sc("false")),
        invalid("server_composition array", sc(r#"["pro"]"#)),
        invalid("server_composition object", sc(r#"{"name":"pro"}"#)),
        invalid("server_composition empty", sc(r#""""#)),
        // event
        invalid("event missing", r#"{"event_type":"deliveries","server_composition":"pro"}"#),
        invalid("event null", event("null")),
        invalid("event array", event(r#"[{"status":"queued"}]"#)),
        invalid("event number", event("1")),
        invalid("event true", event("true")),
        invalid("event empty string", event(r#""""#)),
        j("event string that is not JSON", event(r#""{nope""#), 400, "malformed_json"),
        j("event string truncated", event(r#""{\"deliveries\":[""#), 400, "malformed_json"),
        j("event string of spaces", event(r#""   ""#), 400, "malformed_json"),
        invalid("event string holding an array", event(r#""[]""#)),
        invalid("event string holding null", event(r#""null""#)),
        invalid("event string holding a string", event(r#""\"{}\"""#)),
        accepted("event as a JSON string (lenient)", Some(J), event(r#""{\"deliveries\":[{\"status\":\"queued\"}]}""#), &["cmc.deliveries.queued"]),
        invalid("event without the array", event("{}")),
        invalid("event with another type's array", event(r#"{"bounces":[{"status":"2"}]}"#)),
        invalid("event array is an object", event(r#"{"deliveries":{"status":"queued"}}"#)),
        invalid("event array is a string", event(r#"{"deliveries":"[{\"status\":\"queued\"}]"}"#)),
        invalid("event array is null", event(r#"{"deliveries":null}"#)),
        invalid("event array is a number", event(r#"{"deliveries":0}"#)),
        invalid("string event whose array is an object", event(r#""{\"deliveries\":{}}""#)),
    ];
    run(&app, cases).await;
}

#[tokio::test]
async fn entries_and_statuses_name_the_entry_at_fault() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let long = format!("\"{}\"", "x".repeat(65));
    let too_long = format!("\"{}\"", "x".repeat(129));
    let too_long_utf8 = format!("\"{}\"", "本".repeat(43));
    let max = format!("\"{}\"", "x".repeat(128));
    let max_subject = format!("cmc.deliveries.{}", "x".repeat(128));
    let escaped = |name: &str, status: &str, token: &str| {
        let subject = format!("cmc.deliveries.{token}");
        accepted(
            name,
            Some(J),
            with_status(status),
            &["cmc.deliveries.queued", &subject, "cmc.deliveries.failed"],
        )
    };
    let bounces = |event: &str| batch(r#""bounces""#, r#""pro""#, event);
    let blocks = |event: &str| batch(r#""blocks""#, r#""pro""#, event);
    #[rustfmt::skip]
    let cases = vec![
        // Entries that are not objects, between valid ones
        invalid("entry null", deliveries(&middle("null"))).at(2),
        invalid("entry string", deliveries(&middle(r#""{\"status\":\"queued\"}""#))).at(2),
        invalid("entry number", deliveries(&middle("7"))).at(2),
        invalid("entry boolean", deliveries(&middle("false"))).at(2),
        invalid("entry array", deliveries(&middle(r#"[{"status":"queued"}]"#))).at(2),
        invalid("entry empty object", deliveries(&middle("{}"))).at(2),
        invalid("last entry null", deliveries(r#"[{"status":"queued"},{"status":"failed"},null]"#)).at(2),
        invalid("first entry a number", deliveries(r#"[1,{"status":"queued"}]"#)).at(0),
        invalid("entry of a string event not an object", batch(r#""deliveries""#, r#""pro""#, r#""{\"deliveries\":[{\"status\":\"queued\"},1]}""#)).at(1),
        // Statuses (required for deliveries and bounces)
        invalid("status missing", deliveries(r#"[{"status":"queued"},{"to":"a@example.com"}]"#)).at(1),
        invalid("status null", with_status("null")).at(1),
        invalid("status true", with_status("true")).at(1),
        invalid("status object", with_status(r#"{"code":"queued"}"#)).at(1),
        invalid("status array", with_status(r#"["queued"]"#)).at(1),
        invalid("status float", with_status("1.5")).at(1),
        invalid("status exponent", with_status("2e0")).at(1),
        invalid("status empty", with_status(r#""""#)).at(1),
        // Any status up to 128 bytes arrives, escaped in its subject token (SPEC §1, §2).
        escaped("status with a dot", r#""queued.x""#, "queued%2Ex"),
        escaped("status *", r#""*""#, "%2A"),
        escaped("status >", r#"">""#, "%3E"),
        escaped("status with a space", r#""que ued""#, "que%20ued"),
        escaped("status with a trailing space", r#""queued ""#, "queued%20"),
        escaped("status with a tab", r#""queued\t""#, "queued%09"),
        escaped("status with CR LF", r#""queued\r\nX: 1""#, "queued%0D%0AX%3A%201"),
        escaped("status with NUL", r#""queued\u0000""#, "queued%00"),
        escaped("status with an ideographic space", r#""queued\u3000""#, "queued%E3%80%80"),
        escaped("status of 65 bytes", &long, &"x".repeat(65)),
        invalid("status of 129 bytes", with_status(&too_long)).at(1),
        invalid("status of 129 bytes in 43 characters", with_status(&too_long_utf8)).at(1),
        invalid("bounce status missing", bounces(r#"{"bounces":[{"status":"2"},{"status":2},{}]}"#)).at(2),
        invalid("bounce status 2.0", bounces(r#"{"bounces":[{"status":2.0}]}"#)).at(0),
        invalid("blocks status object", blocks(r#"{"blocks":[{},{"status":{}}]}"#)).at(1),
        invalid("blocks status empty", blocks(r#"{"blocks":[{"status":""}]}"#)).at(0),
        // Valid edges
        accepted("status of 128 bytes", Some(J), with_status(&max), &["cmc.deliveries.queued", &max_subject, "cmc.deliveries.failed"]),
        accepted("bounce status as an integer and a string", Some(J), bounces(r#"{"bounces":[{"status":2},{"status":"2"}]}"#), &["cmc.bounces.2", "cmc.bounces.2"]),
        accepted("blocks status absent or null", Some(J), blocks(r#"{"blocks":[{},{"status":null},{"status":"x"}]}"#), &["cmc.blocks.none", "cmc.blocks.none", "cmc.blocks.x"]),
        accepted("empty array", Some(J), deliveries("[]"), &[]),
    ];
    run(&app, cases).await;
}

#[tokio::test]
async fn broken_form_bodies() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let et = "event_type=deliveries";
    let sc = "server_composition=pro";
    let ev = format!("event={}", urlencode(ONE));
    let ok = ["cmc.deliveries.queued"];
    let event_of = |event: &str| format!("{et}&{sc}&event={}", urlencode(event));
    let raw_ff = |prefix: String| [prefix.as_bytes(), b"\xff"].concat();
    #[rustfmt::skip]
    let cases = vec![
        f("empty form body", "", 422, "invalid_payload"),
        f("only ampersands", "&&&", 422, "invalid_payload"),
        // Broken percent-encoding and UTF-8
        f("%zz in a value", format!("event_type=deli%zzveries&{sc}&{ev}"), 400, "malformed_form"),
        f("%4 at the end of the body", format!("{sc}&{ev}&event_type=deliveries%4"), 400, "malformed_form"),
        f("trailing %", format!("{et}&{sc}&{ev}%"), 400, "malformed_form"),
        f("%+1 (a sign in the hex)", format!("{et}&server_composition=%+1&{ev}"), 400, "malformed_form"),
        f("%zz in a field name", format!("{et}&{sc}&{ev}&x%zz=1"), 400, "malformed_form"),
        f("invalid UTF-8 as %FF", format!("{et}&server_composition=%FF&{ev}"), 400, "malformed_form"),
        f("invalid UTF-8 as a raw byte", raw_ff(format!("{et}&{ev}&server_composition=pro")), 400, "malformed_form"),
        f("truncated UTF-8 sequence", format!("{et}&server_composition=%E6%9C&{ev}"), 400, "malformed_form"),
        f("overlong UTF-8 inside event", format!("{et}&{sc}&event=%7B%22deliveries%22%3A%5B%7B%22status%22%3A%22%C0%AF%22%7D%5D%7D"), 400, "malformed_form"),
        f("trailing % in an unknown field", format!("{et}&{sc}&{ev}&x=%"), 400, "malformed_form"),
        f("invalid UTF-8 in an unknown field", raw_ff(format!("{et}&{sc}&{ev}&x=")), 400, "malformed_form"),
        // Repeated fields
        f("event_type repeated", format!("{et}&{sc}&{ev}&{et}"), 400, "malformed_form"),
        f("event_type repeated, other value", format!("{et}&{sc}&{ev}&event_type=bounces"), 400, "malformed_form"),
        f("server_composition repeated", format!("{sc}&{et}&{sc}&{ev}"), 400, "malformed_form"),
        f("event repeated", format!("{et}&{sc}&{ev}&{ev}"), 400, "malformed_form"),
        f("api_key repeated", format!("{et}&{sc}&{ev}&api_key=a&api_key=a"), 400, "malformed_form"),
        f("unknown field repeated", format!("{et}&{sc}&{ev}&x=1&x=1"), 400, "malformed_form"),
        f("unknown field repeated without values", format!("{et}&{sc}&{ev}&x&x"), 400, "malformed_form"),
        f("name repeated through %-encoding", format!("{et}&{sc}&{ev}&event%5Ftype=deliveries"), 400, "malformed_form"),
        // event
        f("event missing", format!("{et}&{sc}"), 422, "invalid_payload"),
        f("event given but empty", format!("{et}&{sc}&event="), 422, "invalid_payload"),
        f("event without =", format!("{et}&{sc}&event"), 422, "invalid_payload"),
        f("event not JSON", format!("{et}&{sc}&event=%7Bnope"), 400, "malformed_json"),
        f("event JSON not %-encoded, broken", format!("{et}&{sc}&event={{\"deliveries\":[}}"), 400, "malformed_json"),
        f("event a JSON array", event_of("[]"), 422, "invalid_payload"),
        f("event a JSON string", event_of(r#""{\"deliveries\":[]}""#), 422, "invalid_payload"),
        f("event with a duplicate key", event_of(r#"{"deliveries":[],"deliveries":[]}"#), 400, "malformed_json"),
        f("event array missing", event_of(r#"{"bounces":[]}"#), 422, "invalid_payload"),
        f("entry at fault", event_of(&format!(r#"{{"deliveries":{}}}"#, middle("null"))), 422, "invalid_payload").at(2),
        f("status at fault", event_of(r#"{"deliveries":[{"status":"queued"},{"status":""}]}"#), 422, "invalid_payload").at(1),
        // event_type, server_composition
        f("event_type missing", format!("{sc}&{ev}"), 422, "invalid_payload"),
        f("event_type empty", format!("event_type=&{sc}&{ev}"), 422, "invalid_payload"),
        f("event_type with a dot", format!("event_type=deliveries.x&{sc}&event={}", urlencode(r#"{"deliveries.x":[]}"#)), 422, "invalid_payload"),
        f("event_type with + (a space)", format!("event_type=deli+veries&{sc}&{ev}"), 422, "invalid_payload"),
        f("server_composition missing", format!("{et}&{ev}"), 422, "invalid_payload"),
        f("server_composition empty", format!("{et}&server_composition=&{ev}"), 422, "invalid_payload"),
        f("a JSON body sent as a form", valid_json(), 422, "invalid_payload"),
        // Valid edges
        accepted("fields in another order, unknown ones ignored", Some(F), format!("x=1&{ev}&&y&{sc}&{et}"), &ok),
        accepted("%-encoded field names", Some(F), format!("event%5Ftype=deliveries&{sc}&{ev}"), &ok),
    ];
    run(&app, cases).await;
}

#[tokio::test]
async fn wildcards_and_japanese_in_server_composition_are_escaped() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.nats.subject = "cmc.{server_composition}.{event_type}.{status}"
        .parse()
        .unwrap();
    let app = spawn_app_with(settings).await;
    let mut sub = app.subscribe(">").await;
    // (value, subject token, Cmc-Server-Composition): the header is the raw value when it is
    // printable ASCII without leading or trailing space, else escaped like the token (SPEC §2).
    let cases = [
        ("a.b*c>", "a%2Eb%2Ac%3E", "a.b*c>"),
        ("本番", "%E6%9C%AC%E7%95%AA", "%E6%9C%AC%E7%95%AA"),
        ("a b", "a%20b", "a b"),
        (" pro ", "%20pro%20", "%20pro%20"),
        ("   ", "%20%20%20", "%20%20%20"),
        (
            "x\r\nInjected: 1",
            "x%0D%0AInjected%3A%201",
            "x%0D%0AInjected%3A%201",
        ),
        ("nul\u{0}", "nul%00", "nul%00"),
        ("%41", "%2541", "%41"),
        ("pro-1_A", "pro-1_A", "pro-1_A"),
    ];
    let mut failures = Vec::new();
    for (value, token, expected_header) in cases {
        for enc in [Enc::Json, Enc::Form] {
            let name = format!("{value:?} {enc:?}");
            let body = match enc {
                Enc::Json => batch(
                    r#""deliveries""#,
                    &serde_json::to_string(value).unwrap(),
                    ONE,
                ),
                Enc::Form => form(&[
                    ("event", ONE),
                    ("server_composition", value),
                    ("event_type", "deliveries"),
                ]),
            };
            let response = app.post(enc.content_type(), body).await;
            if response.status() != 200 {
                failures.push(format!("  {name}: status {}", response.status()));
                continue;
            }
            let events = drain_events(&app, &mut sub).await;
            let [message] = &events[..] else {
                failures.push(format!("  {name}: {} messages", events.len()));
                continue;
            };
            let subject = format!("cmc.{token}.deliveries.queued");
            if message.subject.as_str() != subject {
                failures.push(format!(
                    "  {name}: subject {}, expected {subject}",
                    message.subject
                ));
            }
            let headers = message.headers.as_ref().expect("headers");
            let got = header(headers, "Cmc-Server-Composition");
            if got != expected_header {
                failures.push(format!(
                    "  {name}: Cmc-Server-Composition {got:?}, expected {expected_header:?}"
                ));
            }
            let body: Value = serde_json::from_slice(&message.payload).unwrap();
            if body["server_composition"] != value {
                failures.push(format!("  {name}: body {body}"));
            }
        }
    }
    assert_silent(&mut sub).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn a_5000_entry_batch_under_the_cap_is_published_whole() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    // What is tested is the size, not the speed: a loaded machine gets time.
    settings.nats.publish_timeout = std::time::Duration::from_secs(15);
    let app = spawn_app_with(settings).await;
    let mut sub = app.subscribe(">").await;
    let statuses = ["queued", "succeeded", "failed", "deferred"];
    let entries: Vec<Value> = (0..5000)
        .map(|i| json!({"status": statuses[i % 4], "to": format!("u{i}@example.com"), "n": i}))
        .collect();
    let event = json!({ "deliveries": entries }).to_string();
    let body = form(&[
        ("event_type", "deliveries"),
        ("server_composition", "pro"),
        ("event", &event),
    ]);
    assert!(body.len() < app.settings.server.max_body_bytes as usize);

    let response = app.post(F, body).await;

    assert_eq!(response.status(), 200);
    assert_eq!(
        json(response).await,
        json!({"result": "ok", "published": 5000})
    );
    let messages = receive(&mut sub, 5000).await;
    for (i, message) in messages.iter().enumerate() {
        assert_eq!(
            message.subject.as_str(),
            format!("cmc.deliveries.{}", statuses[i % 4])
        );
        let headers = message.headers.as_ref().expect("headers");
        assert_eq!(header(headers, "Cmc-Batch-Index"), i.to_string());
    }
    assert_eq!(stored(&app).await, 5000);
    assert_silent(&mut sub).await;
}

#[tokio::test]
async fn body_size_methods_and_paths() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    let cap = 64 * 1024;
    settings.server.max_body_bytes = cap as u64;
    let app = spawn_app_with(settings).await;
    let valid = valid_json();
    let ok = ["cmc.deliveries.queued"];
    let pad = |len: usize| format!("{valid}{}", " ".repeat(len - valid.len()));
    let over_form = format!("{}&x={}", valid_form(), "a".repeat(cap));
    let allow = ("allow", "POST");
    #[rustfmt::skip]
    let cases = vec![
        // Body size, with and without Content-Length
        accepted("exactly max_body_bytes", Some(J), pad(cap), &ok),
        accepted("exactly max_body_bytes, chunked", Some(J), pad(cap), &ok).chunked(),
        j("one byte over", pad(cap + 1), 413, "payload_too_large"),
        j("one byte over, chunked", pad(cap + 1), 413, "payload_too_large").chunked(),
        j("far over", pad(4 * cap), 413, "payload_too_large"),
        j("far over, chunked", pad(4 * cap), 413, "payload_too_large").chunked(),
        f("form over", over_form.clone(), 413, "payload_too_large"),
        f("form over, chunked", over_form, 413, "payload_too_large").chunked(),
        case("over, with an unsupported media type", Some("text/plain"), pad(cap + 1), 413, "payload_too_large"),
        // Methods
        j("PUT", valid.clone(), 405, "method_not_allowed").method(Method::PUT).expect_header(allow.0, allow.1),
        j("DELETE", "", 405, "method_not_allowed").method(Method::DELETE).expect_header(allow.0, allow.1),
        case("GET", None, "", 405, "method_not_allowed").method(Method::GET).expect_header(allow.0, allow.1),
        j("PATCH", valid.clone(), 405, "method_not_allowed").method(Method::PATCH).expect_header(allow.0, allow.1),
        case("OPTIONS", None, "", 405, "method_not_allowed").method(Method::OPTIONS).expect_header(allow.0, allow.1),
        j("PUT with an oversized body", pad(cap + 1), 405, "method_not_allowed").method(Method::PUT),
        // Paths
        j("unknown path", valid.clone(), 404, "not_found").path("/other"),
        j("root path", valid.clone(), 404, "not_found").path("/"),
        j("trailing slash", valid.clone(), 404, "not_found").path("/webhooks/cmc/"),
        j("sub-path", valid.clone(), 404, "not_found").path("/webhooks/cmc/x"),
        j("parent path", valid.clone(), 404, "not_found").path("/webhooks"),
        j("path in another case", valid.clone(), 404, "not_found").path("/Webhooks/CMC"),
        j("%-encoded slash", valid.clone(), 404, "not_found").path("/webhooks%2Fcmc"),
        j("unknown path with GET", "", 404, "not_found").path("/other").method(Method::GET),
        j("unknown path with an oversized body", pad(cap + 1), 404, "not_found").path("/other"),
        j("trailing slash with a query string", valid.clone(), 404, "not_found").path("/webhooks/cmc/?x=1"),
        // Query strings are ignored
        accepted("query string", Some(J), valid.clone(), &ok).path("/webhooks/cmc?x=1"),
        accepted("empty query string", Some(J), valid.clone(), &ok).path("/webhooks/cmc?"),
        accepted("query string naming parameters", Some(J), valid.clone(), &ok).path("/webhooks/cmc?event_type=bounces&status=x&server_composition=y"),
        accepted("query string on a form post", Some(F), valid_form(), &ok).path("/webhooks/cmc?event_type=bounces"),
    ];
    run(&app, cases).await;
}

#[tokio::test]
async fn wrong_credentials_are_unauthorized_in_both_encodings() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.auth.api_key = cmc_forwarder::settings::Secret::new("s3cret").into();
    settings.auth.basic_username = "cmc".into();
    settings.auth.basic_password = cmc_forwarder::settings::Secret::new("pw");
    let cap = 64 * 1024;
    settings.server.max_body_bytes = cap as u64;
    let app = spawn_app_with(settings).await;
    let ok = ["cmc.deliveries.queued"];
    let keyed = |key: &str| {
        format!(
            r#"{{"api_key":{key},"event_type":"deliveries","server_composition":"pro","event":{ONE}}}"#
        )
    };
    let keyed_form = |key: &str| format!("{}&api_key={key}", valid_form());
    let good = keyed(r#""s3cret""#);
    let (www, basic) = ("www-authenticate", "Basic realm=\"cmc-forwarder\"");
    #[rustfmt::skip]
    let cases = vec![
        // Basic
        j("Basic missing", good.clone(), 401, "unauthorized").expect_header(www, basic),
        j("Basic wrong password", good.clone(), 401, "unauthorized").basic("cmc", "wrong").expect_header(www, basic),
        j("Basic wrong user", good.clone(), 401, "unauthorized").basic("CMC", "pw").expect_header(www, basic),
        j("Basic empty password", good.clone(), 401, "unauthorized").basic("cmc", "").expect_header(www, basic),
        j("Basic password with a suffix", good.clone(), 401, "unauthorized").basic("cmc", "pwx").expect_header(www, basic),
        j("Bearer instead of Basic", good.clone(), 401, "unauthorized").header("authorization", "Bearer Y21jOnB3").expect_header(www, basic),
        j("Basic not base64", good.clone(), 401, "unauthorized").header("authorization", "Basic !!!").expect_header(www, basic),
        j("Basic without credentials", good.clone(), 401, "unauthorized").header("authorization", "Basic").expect_header(www, basic),
        f("Basic missing, form", keyed_form("s3cret"), 401, "unauthorized").expect_header(www, basic),
        // Basic is checked before size, media type and decoding
        j("Basic wrong, oversized body", " ".repeat(cap + 1), 401, "unauthorized").basic("cmc", "x"),
        case("Basic missing, unsupported media type", Some("text/plain"), "x", 401, "unauthorized"),
        j("Basic wrong, malformed JSON", "{", 401, "unauthorized").basic("cmc", "x"),
        // api_key, JSON (Basic right)
        j("api_key missing", valid_json(), 401, "unauthorized").basic("cmc", "pw"),
        j("api_key wrong", keyed(r#""wrong""#), 401, "unauthorized").basic("cmc", "pw"),
        j("api_key empty", keyed(r#""""#), 401, "unauthorized").basic("cmc", "pw"),
        j("api_key in upper case", keyed(r#""S3CRET""#), 401, "unauthorized").basic("cmc", "pw"),
        j("api_key with a trailing space", keyed(r#""s3cret ""#), 401, "unauthorized").basic("cmc", "pw"),
        j("api_key a prefix", keyed(r#""s3cre""#), 401, "unauthorized").basic("cmc", "pw"),
        j("api_key a number", keyed("1"), 401, "unauthorized").basic("cmc", "pw"),
        j("api_key null", keyed("null"), 401, "unauthorized").basic("cmc", "pw"),
        j("api_key an array", keyed(r#"["s3cret"]"#), 401, "unauthorized").basic("cmc", "pw"),
        j("api_key only in the query string", valid_json(), 401, "unauthorized").basic("cmc", "pw").path("/webhooks/cmc?api_key=s3cret"),
        j("api_key only in a header", valid_json(), 401, "unauthorized").basic("cmc", "pw").header("api_key", "s3cret"),
        j("api_key only inside event", batch(r#""deliveries""#, r#""pro""#, r#"{"api_key":"s3cret","deliveries":[{"status":"queued"}]}"#), 401, "unauthorized").basic("cmc", "pw"),
        j("api_key only inside an entry", deliveries(r#"[{"status":"queued","api_key":"s3cret"}]"#), 401, "unauthorized").basic("cmc", "pw"),
        // api_key, form (Basic right)
        f("form api_key missing", valid_form(), 401, "unauthorized").basic("cmc", "pw"),
        f("form api_key wrong", keyed_form("wrong"), 401, "unauthorized").basic("cmc", "pw"),
        f("form api_key empty", keyed_form(""), 401, "unauthorized").basic("cmc", "pw"),
        f("form api_key without =", format!("{}&api_key", valid_form()), 401, "unauthorized").basic("cmc", "pw"),
        f("form api_key with %20", keyed_form("s3cret%20"), 401, "unauthorized").basic("cmc", "pw"),
        f("form api_key with +", keyed_form("s3cret+"), 401, "unauthorized").basic("cmc", "pw"),
        f("form API_KEY in upper case", format!("{}&API_KEY=s3cret", valid_form()), 401, "unauthorized").basic("cmc", "pw"),
        // Decoding comes before api_key, api_key before validation
        j("no api_key, malformed JSON", "{", 400, "malformed_json").basic("cmc", "pw"),
        f("no api_key, malformed form", format!("{}&server_composition=%zz", valid_form()), 400, "malformed_form").basic("cmc", "pw"),
        f("form api_key repeated", format!("{}&api_key=s3cret&api_key=s3cret", valid_form()), 400, "malformed_form").basic("cmc", "pw"),
        j("no api_key, invalid payload", deliveries("[null]"), 401, "unauthorized").basic("cmc", "pw"),
        j("wrong api_key, invalid payload", r#"{"api_key":"x","event_type":"Nope"}"#, 401, "unauthorized").basic("cmc", "pw"),
        j("right api_key, invalid payload", format!(r#"{{"api_key":"s3cret","event_type":"Nope","server_composition":"pro","event":{ONE}}}"#), 422, "invalid_payload").basic("cmc", "pw"),
        // Both right, both encodings
        accepted("both right, JSON", Some(J), good.clone(), &ok).basic("cmc", "pw"),
        accepted("both right, form", Some(F), keyed_form("s3cret"), &ok).basic("cmc", "pw"),
        accepted("both right, lower-case scheme", Some(J), good.clone(), &ok).header("authorization", "basic Y21jOnB3"),
    ];
    run(&app, cases).await;
}

#[tokio::test]
async fn clients_outside_the_allow_list_cannot_spoof_their_way_in() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.auth.allowed_ips = vec!["203.0.113.0/24".parse().unwrap()];
    // A proxy range is configured, but the test client (127.0.0.1) is not in it.
    settings.auth.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
    let cap = 64 * 1024;
    settings.server.max_body_bytes = cap as u64;
    let app = spawn_app_with(settings).await;
    let valid = valid_json();
    #[rustfmt::skip]
    let cases = vec![
        j("not allowed", valid.clone(), 403, "forbidden"),
        j("spoofed X-Forwarded-For", valid.clone(), 403, "forbidden").header("x-forwarded-for", "203.0.113.5"),
        j("spoofed X-Forwarded-For chain", valid.clone(), 403, "forbidden").header("x-forwarded-for", "203.0.113.5, 10.1.1.1"),
        j("spoofed X-Real-IP", valid.clone(), 403, "forbidden").header("x-real-ip", "203.0.113.5"),
        j("spoofed Forwarded", valid.clone(), 403, "forbidden").header("forwarded", "for=203.0.113.5"),
        j("garbage X-Forwarded-For", valid.clone(), 403, "forbidden").header("x-forwarded-for", "not an ip"),
        f("not allowed, form", valid_form(), 403, "forbidden"),
        // The client address is checked before size and media type
        case("not allowed, unsupported media type", Some("text/plain"), "x", 403, "forbidden"),
        j("not allowed, oversized", " ".repeat(cap + 1), 403, "forbidden"),
        // Path and method are checked before the client address
        j("not allowed, GET", "", 405, "method_not_allowed").method(Method::GET).expect_header("allow", "POST"),
        j("not allowed, unknown path", valid.clone(), 404, "not_found").path("/other"),
    ];
    run(&app, cases).await;
}

#[tokio::test]
async fn an_entry_field_named_api_key_is_forwarded_the_top_level_one_never() {
    let nats = NatsServer::start().await;
    let mut settings = test_settings(&nats);
    settings.auth.api_key = cmc_forwarder::settings::Secret::new("s3cret").into();
    let app = spawn_app_with(settings).await;
    let mut sub = app.subscribe(">").await;
    let entries =
        r#"[{"status":"queued","api_key":"entry-key","to":"a@example.com"},{"status":"failed"}]"#;
    let event = format!(r#"{{"deliveries":{entries}}}"#);
    let json_body = format!(
        r#"{{"event_type":"deliveries","api_key":"s3cret","server_composition":"pro","event":{event}}}"#
    );
    let form_body = form(&[
        ("api_key", "s3cret"),
        ("event_type", "deliveries"),
        ("server_composition", "pro"),
        ("event", &event),
    ]);
    for (enc, body) in [(Enc::Json, json_body), (Enc::Form, form_body)] {
        let response = app.post(enc.content_type(), body).await;
        assert_eq!(response.status(), 200, "{enc:?}");
        let events = drain_events(&app, &mut sub).await;
        assert_eq!(events.len(), 2, "{enc:?}");
        let first: Value = serde_json::from_slice(&events[0].payload).unwrap();
        assert_eq!(
            first,
            json!({"event_type": "deliveries", "server_composition": "pro", "status": "queued", "api_key": "entry-key", "to": "a@example.com"}),
            "{enc:?}"
        );
        let second: Value = serde_json::from_slice(&events[1].payload).unwrap();
        assert!(second.get("api_key").is_none(), "{enc:?}: {second}");
        for message in &events {
            assert!(
                !String::from_utf8_lossy(&message.payload).contains("s3cret"),
                "{enc:?}"
            );
            for (_, values) in message.headers.as_ref().unwrap().iter() {
                for value in values {
                    assert!(!value.as_str().contains("s3cret"), "{enc:?}");
                }
            }
        }
    }
    assert_silent(&mut sub).await;
}

/// Nesting far beyond the parser's limit, well under the body cap, must be refused, not crash
/// the process: 20 000 levels overflowed a 2 MiB stack before the decoder bounded the depth.
#[tokio::test]
async fn deeply_nested_json_is_refused_without_crashing() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let depth = 20_000;
    let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let object = format!("{}{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
    #[rustfmt::skip]
    let cases = vec![
        j("20000 nested arrays in an entry", deliveries(&format!(r#"[{{"status":"queued","x":{nested}}}]"#)), 400, "malformed_json"),
        j("20000 nested objects in an entry", deliveries(&format!(r#"[{{"status":"queued","x":{object}}}]"#)), 400, "malformed_json"),
        f("20000 nested arrays in a form entry", format!("event_type=deliveries&server_composition=pro&event={}", urlencode(&format!(r#"{{"deliveries":[{{"status":"queued","x":{nested}}}]}}"#))), 400, "malformed_json"),
    ];
    run(&app, cases).await;
    // Still alive.
    let r = app.post(J, valid_json()).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_hostile_status_is_escaped_and_arrives() {
    let nats = NatsServer::start().await;
    let app = spawn_app(&nats).await;
    let mut sub = app.subscribe(">").await;
    // Separators, wildcards, a space, CR LF with a header line after it, NUL, non-ASCII.
    let status = "a.b*> c\r\nX-Injected: 1\0本";
    let body = json!({
        "event_type": "deliveries",
        "server_composition": "pro",
        "event": {"deliveries": [{"status": status, "to": "a@example.com"}]},
    });
    let response = app.post(J, body.to_string()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(json(response).await["published"], 1);
    let message = receive(&mut sub, 1).await.remove(0);
    let escaped = "a%2Eb%2A%3E%20c%0D%0AX-Injected%3A%201%00%E6%9C%AC";
    assert_eq!(
        message.subject.as_str(),
        format!("cmc.deliveries.{escaped}")
    );
    let headers = message.headers.as_ref().unwrap();
    assert_eq!(header(headers, "Cmc-Status"), escaped);
    assert!(headers.get("X-Injected").is_none());
    let received: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(
        received["status"], status,
        "the body keeps the status verbatim"
    );
    assert_eq!(stored(&app).await, 1);
}
