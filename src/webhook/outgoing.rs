//! Step 3: one outgoing message per entry: subject, JSON body and header values, for valid
//! entries and (in dead-letter mode) invalid ones alike, so both are delivered, acknowledged
//! and spooled the same way.

use std::ops::Range;

use bytes::Bytes;
use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use sha2::{Digest, Sha256};

use super::json::{write_canonical, write_compact, write_string, Json, Members};
use super::validate::InvalidEntry;
use super::{Batch, PayloadError};
use crate::subject::{
    bounce_status_name, header_value, SubjectTemplate, SubjectValues, MAX_SUBJECT_BYTES,
};

/// Which headers each message carries (`nats.headers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderShape {
    /// Every header of SPEC §2.
    #[default]
    Full,
    /// Only `Nats-Msg-Id` (JetStream de-duplication) and `Cmc-Batch-Id` (correlation with
    /// the request), plus `Cmc-Error` on dead letters: the rest is in the subject and the
    /// body, and nats-server spends noticeably less per message on two headers than on seven.
    Minimal,
}

/// What the status token is when an entry has none.
const NO_STATUS: &str = "none";

/// One message, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub subject: String,
    /// The JSON body.
    pub payload: Bytes,
    /// `Nats-Msg-Id`: lowercase hex SHA-256 of the event's identity.
    pub msg_id: String,
    /// `Cmc-Status` (empty for a dead letter, which has no usable status).
    pub status_header: String,
    /// `Cmc-Error`: set on dead letters only, the reason the entry is invalid (escaped).
    pub error: Option<String>,
    /// `Cmc-Batch-Index`: the entry's position in its batch.
    pub index: usize,
}

impl Outgoing {
    /// Whether this message carries an invalid entry to the dead-letter subject.
    pub fn is_dead_letter(&self) -> bool {
        self.error.is_some()
    }
}

/// The messages of one request, with the header values they share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingBatch {
    /// `Cmc-Batch-Id`.
    pub batch_id: String,
    /// `Cmc-Event-Type`.
    pub event_type_header: String,
    /// `Cmc-Server-Composition`.
    pub server_composition_header: String,
    /// `traceparent`, the same for every message of the batch (built once per request);
    /// empty: not sent.
    pub traceparent: String,
    /// `nats.headers`: which headers every message of the batch carries.
    pub shape: HeaderShape,
    /// In entry order, dead letters at their entry's position.
    pub messages: Vec<Outgoing>,
    /// Entries whose `created` could not be read as a time in the configured zone (so their
    /// body has no `created_at`); always 0 without a zone.
    pub created_unparsed: usize,
    /// Messages that are dead letters.
    pub invalid: usize,
}

/// The most headers one message carries.
const MAX_HEADERS: usize = 9;

/// The headers of one message, in the order they are sent.
#[derive(Debug, Clone)]
pub struct Headers<'a> {
    items: [(&'static str, HeaderValue<'a>); MAX_HEADERS],
    len: usize,
}

impl<'a> Headers<'a> {
    fn push(&mut self, name: &'static str, value: HeaderValue<'a>) {
        self.items[self.len] = (name, value);
        self.len += 1;
    }

    pub fn iter(&self) -> std::slice::Iter<'_, (&'static str, HeaderValue<'a>)> {
        self.items[..self.len].iter()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<'a> IntoIterator for Headers<'a> {
    type Item = (&'static str, HeaderValue<'a>);
    type IntoIter = std::iter::Take<std::array::IntoIter<Self::Item, MAX_HEADERS>>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter().take(self.len)
    }
}

impl OutgoingBatch {
    /// The headers of `message`, in the order they are sent.
    ///
    /// In the minimal shape only `Nats-Msg-Id` and `Cmc-Batch-Id` are sent, and `Cmc-Error`
    /// on a dead letter: the reason an entry is invalid is in no subject or body field.
    pub fn headers<'a>(&'a self, message: &'a Outgoing) -> Headers<'a> {
        let mut h = Headers {
            items: [("", HeaderValue::Str("")); MAX_HEADERS],
            len: 0,
        };
        h.push("Nats-Msg-Id", HeaderValue::Str(&message.msg_id));
        if self.shape == HeaderShape::Minimal {
            h.push("Cmc-Batch-Id", HeaderValue::Str(&self.batch_id));
            if let Some(error) = &message.error {
                h.push("Cmc-Error", HeaderValue::Str(error));
            }
            return h;
        }
        h.push("Content-Type", HeaderValue::Str("application/json"));
        h.push("Cmc-Event-Type", HeaderValue::Str(&self.event_type_header));
        match &message.error {
            None => h.push("Cmc-Status", HeaderValue::Str(&message.status_header)),
            Some(error) => h.push("Cmc-Error", HeaderValue::Str(error)),
        }
        h.push(
            "Cmc-Server-Composition",
            HeaderValue::Str(&self.server_composition_header),
        );
        h.push("Cmc-Batch-Id", HeaderValue::Str(&self.batch_id));
        h.push("Cmc-Batch-Index", HeaderValue::Index(message.index));
        if !self.traceparent.is_empty() {
            h.push("traceparent", HeaderValue::Str(&self.traceparent));
        }
        h
    }

    /// Whether header `name` can differ between two messages of one batch that are not
    /// dead letters; every other header of [`OutgoingBatch::headers`] is the same for all of
    /// them, so it can be prepared once per batch.
    pub fn varying_header(name: &str) -> bool {
        matches!(name, "Nats-Msg-Id" | "Cmc-Status" | "Cmc-Batch-Index")
    }

    /// The size NATS counts against `max_payload` for `message`: the serialised header block
    /// (`NATS/1.0\r\n`, `Name: value\r\n` each, `\r\n`) plus the payload.
    pub fn wire_size(&self, message: &Outgoing) -> usize {
        crate::wire::wire_size(
            self.headers(message)
                .iter()
                .map(|(name, value)| (name.len(), value.len())),
            message.payload.len(),
        )
    }
}

/// Lowercase hex of a SHA-256 digest (at most 32 bytes): two digits per byte from a table
/// into a buffer on the stack, then one allocation (`hex::encode` builds its string a `char`
/// at a time: two percent of the service's instructions per event; `hex::encode_to_slice`
/// still a third of that).
fn lower_hex(digest: &[u8]) -> String {
    assert!(digest.len() <= 32, "a SHA-256 digest");
    /// The two hex digits of every byte.
    const PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut pairs = [[0u8; 2]; 256];
        let mut b = 0;
        while b < 256 {
            pairs[b] = [HEX[b >> 4], HEX[b & 0xf]];
            b += 1;
        }
        pairs
    };
    let mut text = [0u8; 64];
    for (pair, &b) in text.chunks_exact_mut(2).zip(digest) {
        pair.copy_from_slice(&PAIRS[b as usize]);
    }
    std::str::from_utf8(&text[..2 * digest.len()])
        .expect("hex digits are ASCII")
        .to_owned()
}

/// How many decimal digits `n` has.
fn decimal_digits(n: usize) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

/// A header value, borrowed or a number rendered on demand.
#[derive(Debug, Clone, Copy)]
pub enum HeaderValue<'a> {
    Str(&'a str),
    Index(usize),
}

impl HeaderValue<'_> {
    fn len(&self) -> usize {
        match self {
            HeaderValue::Str(s) => s.len(),
            HeaderValue::Index(i) => decimal_digits(*i),
        }
    }

    /// The value as an owned string (what the NATS client's header map takes).
    pub fn to_owned_string(self) -> String {
        match self {
            HeaderValue::Str(s) => s.to_owned(),
            HeaderValue::Index(i) => i.to_string(),
        }
    }
}

impl std::fmt::Display for HeaderValue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderValue::Str(s) => f.write_str(s),
            HeaderValue::Index(i) => write!(f, "{i}"),
        }
    }
}

/// The fields the service adds to every body; an entry's own copies are dropped.
const ADDED_FIELDS: [&str; 2] = ["event_type", "server_composition"];
const CREATED_AT: &str = "created_at";

/// `created` (`YYYY-MM-DD HH:MM:SS`, no offset, in the CMC console's zone) as RFC 3339 with
/// the offset in force then. Times in a daylight-saving gap or fold resolve as RFC 5545
/// ("compatible") does: gaps move forward, folds take the earlier instant.
pub fn created_at(created: &str, zone: &TimeZone) -> Option<String> {
    let civil = DateTime::strptime("%Y-%m-%d %H:%M:%S", created).ok()?;
    let zoned = civil.to_zoned(zone.clone()).ok()?;
    Some(
        zoned
            .timestamp()
            .display_with_offset(zoned.offset())
            .to_string(),
    )
}

/// How a batch is rendered, fixed at start-up except for the trace context.
#[derive(Debug, Clone, Copy)]
pub struct Render<'a> {
    /// `nats.subject`.
    pub template: &'a SubjectTemplate,
    /// `validation.dead_letter_subject` in dead-letter mode; `None`: all-or-nothing, so an
    /// entry whose subject is too long refuses the request.
    pub dead_letter: Option<&'a SubjectTemplate>,
    /// `cmc.timezone`: adds `created_at` to bodies when set.
    pub zone: Option<&'a TimeZone>,
    /// The batch's `traceparent` header value; empty: none.
    pub traceparent: &'a str,
    /// `nats.headers`.
    pub shape: HeaderShape,
}

impl<'a> Render<'a> {
    /// Plain rendering with `template`: no dead letters, no zone, no trace context.
    pub fn new(template: &'a SubjectTemplate) -> Self {
        Render {
            template,
            dead_letter: None,
            zone: None,
            traceparent: "",
            shape: HeaderShape::Full,
        }
    }
}

impl Batch<'_> {
    /// Renders every entry into its message with `template`, all-or-nothing (see
    /// [`Batch::render`]).
    pub fn to_outgoing(
        &self,
        template: &SubjectTemplate,
        batch_id: &str,
    ) -> Result<OutgoingBatch, PayloadError> {
        self.render(&Render::new(template), batch_id)
    }

    /// Renders every entry into its message; `batch_id` identifies the request.
    ///
    /// An entry whose subject would be longer than [`MAX_SUBJECT_BYTES`] is invalid: it
    /// refuses the request, or becomes a dead letter when `how.dead_letter` is set. A
    /// dead-letter subject that is itself too long refuses the request.
    pub fn render(&self, how: &Render<'_>, batch_id: &str) -> Result<OutgoingBatch, PayloadError> {
        let event_type = self.event_type.as_str();
        let sc = self.server_composition.as_str();
        let identity = |extra: Option<&str>| {
            let mut h = Sha256::new();
            h.update(sc.as_bytes());
            h.update([0]);
            h.update(event_type.as_bytes());
            h.update([0]);
            if let Some(extra) = extra {
                h.update(extra.as_bytes());
                h.update([0]);
            }
            h
        };
        let id_prefix = identity(None);
        let mut scratch = Vec::new();
        let mut canonical = CanonicalOrder::default();
        let mut created_unparsed = 0;
        let mut messages = Vec::with_capacity(self.entries.len() + self.invalid.len());
        // Entries whose subject turned out too long, dead-lettered below.
        let mut too_long = Vec::new();
        // What every body starts with, written once per batch.
        let mut head = Vec::with_capacity(40 + event_type.len() + sc.len());
        head.extend_from_slice(b"{\"event_type\":");
        write_string(&mut head, event_type);
        head.extend_from_slice(b",\"server_composition\":");
        write_string(&mut head, sc);
        let mut by_status = StatusCache::default();
        // Where each field of the entry is in its body, when its text there is also its
        // canonical text (see `CanonicalOrder::write_from`).
        let mut spans: Vec<Option<Range<usize>>> = Vec::new();
        // The size of the previous body: the next one is usually about as long.
        let mut body_hint = head.len() + 64;
        for entry in &self.entries {
            let status = entry.status.as_ref().map_or(NO_STATUS, |s| s.as_str());
            let (subject, status_header) = by_status.get(status, || {
                let status_name = if self.event_type.is_bounces() {
                    bounce_status_name(status)
                } else {
                    status
                };
                let subject = how.template.render(&SubjectValues {
                    event_type,
                    status,
                    status_name,
                    server_composition: sc,
                });
                (subject, header_value(status))
            });
            if subject.len() > MAX_SUBJECT_BYTES {
                let error = format!(
                    "its subject would be {} bytes long, over the limit of {MAX_SUBJECT_BYTES}",
                    subject.len()
                );
                if how.dead_letter.is_none() {
                    return Err(PayloadError::invalid_entry(entry.index, error));
                }
                too_long.push(InvalidEntry {
                    index: entry.index,
                    error,
                    value: Json::Object(entry.fields.clone()),
                });
                continue;
            }

            let mut payload = Vec::with_capacity(body_hint + 32);
            payload.extend_from_slice(&head);
            let stamp = how.zone.and_then(|zone| {
                let stamp = match entry.fields.get("created") {
                    Some(Json::String(created)) => created_at(created, zone),
                    _ => None,
                };
                if stamp.is_none() {
                    created_unparsed += 1;
                }
                stamp
            });
            if let Some(stamp) = &stamp {
                payload.extend_from_slice(b",\"created_at\":");
                write_string(&mut payload, stamp);
            }
            spans.clear();
            for (key, value) in &entry.fields.0 {
                if ADDED_FIELDS.contains(&key.as_ref()) || (stamp.is_some() && key == CREATED_AT) {
                    spans.push(None);
                    continue;
                }
                payload.push(b',');
                let start = payload.len();
                write_string(&mut payload, key);
                payload.push(b':');
                write_compact(&mut payload, value);
                spans.push(compact_is_canonical(value).then_some(start..payload.len()));
            }
            payload.push(b'}');
            body_hint = payload.len();

            scratch.clear();
            canonical.write_from(&mut scratch, &entry.fields, &payload, &spans);
            let mut hasher = id_prefix.clone();
            hasher.update(&scratch);
            let msg_id = lower_hex(&hasher.finalize());

            messages.push(Outgoing {
                subject,
                payload: Bytes::from(payload),
                msg_id,
                status_header,
                error: None,
                index: entry.index,
            });
        }

        let invalid = self.invalid.len() + too_long.len();
        if invalid > 0 {
            let template = how.dead_letter.ok_or_else(|| {
                // Only dead-letter validation keeps invalid entries; reaching this is a bug of
                // the caller, answered as the first invalid entry.
                let first = &self.invalid[0];
                PayloadError::invalid_entry(first.index, first.error.clone())
            })?;
            let subject = template.render(&SubjectValues {
                event_type,
                status: NO_STATUS,
                status_name: NO_STATUS,
                server_composition: sc,
            });
            if subject.len() > MAX_SUBJECT_BYTES {
                return Err(PayloadError::invalid(format!(
                    "the dead-letter subject would be {} bytes long, over the limit of {MAX_SUBJECT_BYTES}",
                    subject.len()
                )));
            }
            let dead_prefix = identity(Some("invalid"));
            for entry in self.invalid.iter().chain(&too_long) {
                scratch.clear();
                write_canonical(&mut scratch, &entry.value);
                let mut hasher = dead_prefix.clone();
                hasher.update(&scratch);
                let msg_id = lower_hex(&hasher.finalize());

                let mut payload = Vec::with_capacity(128 + sc.len() + entry.error.len());
                payload.extend_from_slice(b"{\"event_type\":");
                write_string(&mut payload, event_type);
                payload.extend_from_slice(b",\"server_composition\":");
                write_string(&mut payload, sc);
                payload
                    .extend_from_slice(format!(",\"index\":{},\"error\":", entry.index).as_bytes());
                write_string(&mut payload, &entry.error);
                payload.extend_from_slice(b",\"entry\":");
                write_compact(&mut payload, &entry.value);
                payload.push(b'}');

                messages.push(Outgoing {
                    subject: subject.clone(),
                    payload: Bytes::from(payload),
                    msg_id,
                    status_header: String::new(),
                    error: Some(header_value(&entry.error)),
                    index: entry.index,
                });
            }
            // Entry order on the bus, as for any batch.
            messages.sort_by_key(|m| m.index);
        }
        Ok(OutgoingBatch {
            batch_id: batch_id.to_owned(),
            event_type_header: header_value(event_type),
            server_composition_header: header_value(sc),
            traceparent: how.traceparent.to_owned(),
            shape: how.shape,
            messages,
            created_unparsed,
            invalid,
        })
    }
}

/// Writes entries in canonical form, reusing the sorted order of the previous entry when the
/// keys are the same (in a batch they almost always are: one schema per event type).
#[derive(Default)]
struct CanonicalOrder {
    /// The previous entry's keys in their original order, and the sorted permutation.
    keys: Vec<String>,
    order: Vec<usize>,
}

impl CanonicalOrder {
    /// The sorted permutation of `fields`' keys.
    fn order_of(&mut self, fields: &Members<'_, Json<'_>>) -> &[usize] {
        let same = self.keys.len() == fields.0.len()
            && self.keys.iter().zip(&fields.0).all(|(a, (b, _))| a == b);
        if !same {
            self.keys = fields.0.iter().map(|(k, _)| k.to_string()).collect();
            self.order = (0..self.keys.len()).collect();
            let keys = &self.keys;
            self.order
                .sort_by(|&a, &b| keys[a].as_bytes().cmp(keys[b].as_bytes()));
        }
        &self.order
    }

    #[cfg(test)]
    fn write(&mut self, out: &mut Vec<u8>, fields: &Members<'_, Json<'_>>) {
        let order = self.order_of(fields);
        super::json::write_canonical_members_in(out, fields, order);
    }

    /// Writes `fields` in canonical form, copying a field's `"key":value` from `body` where
    /// `spans` has its place there (its compact text is already canonical: the same escaping,
    /// no object whose keys are out of order) and writing the others.
    fn write_from(
        &mut self,
        out: &mut Vec<u8>,
        fields: &Members<'_, Json<'_>>,
        body: &[u8],
        spans: &[Option<Range<usize>>],
    ) {
        let order = self.order_of(fields);
        out.push(b'{');
        for (n, &i) in order.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            match &spans[i] {
                Some(span) => out.extend_from_slice(&body[span.clone()]),
                None => {
                    let (key, value) = &fields.0[i];
                    write_string(out, key);
                    out.push(b':');
                    write_canonical(out, value);
                }
            }
        }
        out.push(b'}');
    }
}

/// Whether `value`'s compact text is also its canonical text: true unless it holds an object
/// whose keys are not already in sorted order.
fn compact_is_canonical(value: &Json<'_>) -> bool {
    match value {
        Json::Array(items) => items.iter().all(compact_is_canonical),
        Json::Object(members) => {
            members
                .0
                .windows(2)
                .all(|w| w[0].0.as_bytes() <= w[1].0.as_bytes())
                && members.0.iter().all(|(_, v)| compact_is_canonical(v))
        }
        _ => true,
    }
}

/// The subject and `Cmc-Status` of the statuses met so far in a batch (a batch has a
/// handful): each is rendered once, not once per entry.
#[derive(Default)]
struct StatusCache {
    seen: Vec<(String, String, String)>,
}

impl StatusCache {
    /// At most this many statuses are kept; others are rendered every time.
    const LIMIT: usize = 16;

    /// `(subject, status header)` of `status`, made by `render` the first time.
    fn get(&mut self, status: &str, render: impl FnOnce() -> (String, String)) -> (String, String) {
        if let Some((_, subject, header)) = self.seen.iter().find(|(s, _, _)| s == status) {
            return (subject.clone(), header.clone());
        }
        let (subject, header) = render();
        if self.seen.len() < Self::LIMIT {
            self.seen
                .push((status.to_owned(), subject.clone(), header.clone()));
        }
        (subject, header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::decode;
    use proptest::prelude::*;

    fn template() -> SubjectTemplate {
        SubjectTemplate::parse("cmc.{event_type}.{status}").unwrap()
    }

    #[test]
    fn digits_and_hex_match_the_formatted_text() {
        for n in [0, 1, 9, 10, 99, 100, 9_999, 10_000, usize::MAX] {
            assert_eq!(decimal_digits(n), n.to_string().len(), "{n}");
        }
        let digest = Sha256::digest(b"cmc");
        assert_eq!(lower_hex(&digest), hex::encode(digest));
    }

    fn split(content_type: &str, body: &str) -> OutgoingBatch {
        decode(Some(content_type), body.as_bytes())
            .unwrap()
            .validate()
            .unwrap()
            .to_outgoing(&template(), "b-1")
            .unwrap()
    }

    const ENTRY: &str = r#"{"created":"2023-01-25 14:03:06","messageId":"\u003Cid@x\u003E","status":"queued","n":1.50,"event_type":"spoof","api_key":"entry-field"}"#;

    fn json_body(sc: &str) -> String {
        format!(
            r#"{{"api_key":"secret","event_type":"deliveries","server_composition":"{sc}","event":{{"deliveries":[{ENTRY}]}}}}"#
        )
    }

    #[test]
    fn body_has_added_fields_first_then_entry_fields_verbatim() {
        let out = split("application/json", &json_body("pro"));
        let m = &out.messages[0];
        assert_eq!(m.subject, "cmc.deliveries.queued");
        assert_eq!(
            String::from_utf8(m.payload.to_vec()).unwrap(),
            r#"{"event_type":"deliveries","server_composition":"pro","created":"2023-01-25 14:03:06","messageId":"<id@x>","status":"queued","n":1.50,"api_key":"entry-field"}"#
        );
        assert!(!String::from_utf8_lossy(&m.payload).contains("secret"));
    }

    #[test]
    fn msg_id_is_sha256_of_identity_and_canonical_entry() {
        let out = split("application/json", &json_body("pro"));
        let canonical = r#"{"api_key":"entry-field","created":"2023-01-25 14:03:06","event_type":"spoof","messageId":"<id@x>","n":1.50,"status":"queued"}"#;
        let expected = hex::encode(Sha256::digest(
            [b"pro\0deliveries\0".as_slice(), canonical.as_bytes()].concat(),
        ));
        assert_eq!(out.messages[0].msg_id, expected);
        let other = split("application/json", &json_body("sandbox"));
        assert_ne!(other.messages[0].msg_id, expected);
    }

    #[test]
    fn both_encodings_give_the_same_messages() {
        let json = split("application/json", &json_body("本番"));
        let event = format!(r#"{{"deliveries":[{ENTRY}]}}"#);
        let form = format!(
            "event={}&server_composition=%E6%9C%AC%E7%95%AA&event_type=deliveries",
            urlencode(&event)
        );
        let form = split("application/x-www-form-urlencoded", &form);
        assert_eq!(json, form);
        assert_eq!(json.server_composition_header, "%E6%9C%AC%E7%95%AA");
    }

    #[test]
    fn headers_and_wire_size() {
        let out = split("application/json", &json_body("pro"));
        let m = &out.messages[0];
        let headers: Vec<(String, String)> = out
            .headers(m)
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(headers[0], ("Nats-Msg-Id".into(), m.msg_id.clone()));
        assert_eq!(headers[3], ("Cmc-Status".into(), "queued".into()));
        assert_eq!(headers[6], ("Cmc-Batch-Index".into(), "0".into()));
        let block: String = headers
            .iter()
            .map(|(n, v)| format!("{n}: {v}\r\n"))
            .collect();
        assert_eq!(
            out.wire_size(m),
            format!("NATS/1.0\r\n{block}\r\n").len() + m.payload.len()
        );
    }

    #[test]
    fn bounce_status_names_and_missing_status() {
        let t = SubjectTemplate::parse("cmc.{event_type}.{status_name}").unwrap();
        let body = r#"{"event_type":"bounces","server_composition":"pro","event":{"bounces":[{"status":"2"},{"status":7},{"status":"42"}]}}"#;
        let out = decode(Some("application/json"), body.as_bytes())
            .unwrap()
            .validate()
            .unwrap()
            .to_outgoing(&t, "b")
            .unwrap();
        let subjects: Vec<_> = out.messages.iter().map(|m| m.subject.as_str()).collect();
        assert_eq!(
            subjects,
            [
                "cmc.bounces.user_unknown",
                "cmc.bounces.receiver_error",
                "cmc.bounces.other"
            ]
        );
        let blocks = split(
            "application/json",
            r#"{"event_type":"blocks","server_composition":"pro","event":{"blocks":[{"a":1}]}}"#,
        );
        assert_eq!(blocks.messages[0].subject, "cmc.blocks.none");
        assert_eq!(blocks.messages[0].status_header, "none");
    }

    fn zone(name: &str) -> TimeZone {
        // `±HH:MM` offsets or IANA names, as `cmc.timezone` takes them.
        let sign = match name.as_bytes()[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return TimeZone::get(name).unwrap(),
        };
        let (h, m): (i32, i32) = (name[1..3].parse().unwrap(), name[4..6].parse().unwrap());
        TimeZone::fixed(jiff::tz::Offset::from_seconds(sign * (h * 3600 + m * 60)).unwrap())
    }

    #[test]
    fn created_at_in_tokyo_a_fixed_offset_and_new_york_across_dst() {
        let tokyo = zone("Asia/Tokyo");
        assert_eq!(
            created_at("2023-01-25 14:03:06", &tokyo).as_deref(),
            Some("2023-01-25T14:03:06+09:00")
        );
        assert_eq!(
            created_at("2023-01-25 14:03:06", &zone("+05:30")).as_deref(),
            Some("2023-01-25T14:03:06+05:30")
        );
        assert_eq!(
            created_at("2023-01-25 14:03:06", &zone("-03:00")).as_deref(),
            Some("2023-01-25T14:03:06-03:00")
        );
        let ny = zone("America/New_York");
        // 2024-03-10 02:00 EST → 03:00 EDT.
        assert_eq!(
            created_at("2024-03-10 01:59:59", &ny).as_deref(),
            Some("2024-03-10T01:59:59-05:00")
        );
        assert_eq!(
            created_at("2024-03-10 03:00:00", &ny).as_deref(),
            Some("2024-03-10T03:00:00-04:00")
        );
        // In the gap: moved forward by the gap's length.
        assert_eq!(
            created_at("2024-03-10 02:30:00", &ny).as_deref(),
            Some("2024-03-10T03:30:00-04:00")
        );
        // 2024-11-03 02:00 EDT → 01:00 EST: the fold takes the earlier instant.
        assert_eq!(
            created_at("2024-11-03 01:30:00", &ny).as_deref(),
            Some("2024-11-03T01:30:00-04:00")
        );
        assert_eq!(
            created_at("2024-11-03 02:30:00", &ny).as_deref(),
            Some("2024-11-03T02:30:00-05:00")
        );
        for bad in [
            "",
            "2023-01-25",
            "2023-01-25T14:03:06",
            "2023-13-01 00:00:00",
            "yesterday",
        ] {
            assert_eq!(created_at(bad, &tokyo), None, "{bad}");
        }
    }

    #[test]
    fn created_at_follows_server_composition_and_replaces_an_entry_copy() {
        let body = r#"{"event_type":"deliveries","server_composition":"pro","event":{"deliveries":[
            {"created":"2023-01-25 14:03:06","status":"queued","created_at":"spoof"},
            {"created":"not a time","status":"queued","created_at":"kept"},
            {"status":"queued"}]}}"#;
        let decoded = decode(Some("application/json"), body.as_bytes()).unwrap();
        let batch = decoded.validate().unwrap();
        let tokyo = zone("Asia/Tokyo");
        let t = template();
        let how = Render {
            zone: Some(&tokyo),
            ..Render::new(&t)
        };
        let out = batch.render(&how, "b").unwrap();
        let bodies: Vec<String> = out
            .messages
            .iter()
            .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
            .collect();
        assert_eq!(
            bodies[0],
            r#"{"event_type":"deliveries","server_composition":"pro","created_at":"2023-01-25T14:03:06+09:00","created":"2023-01-25 14:03:06","status":"queued"}"#
        );
        assert_eq!(
            bodies[1],
            r#"{"event_type":"deliveries","server_composition":"pro","created":"not a time","status":"queued","created_at":"kept"}"#
        );
        assert_eq!(out.created_unparsed, 2);
        // The id does not depend on the zone: it hashes the entry as received.
        let plain = batch.to_outgoing(&template(), "b").unwrap();
        assert_eq!(plain.messages[0].msg_id, out.messages[0].msg_id);
        assert_eq!(plain.created_unparsed, 0);
    }

    #[test]
    fn dead_letters_carry_error_and_entry_in_entry_order() {
        use crate::webhook::InvalidEntries;
        let body = r#"{"event_type":"deliveries","server_composition":"pro","event":{"deliveries":[
            {"status":"queued","n":1},"oops",{"to":"a@b","n":2.50},{"status":"failed"}]}}"#;
        let decoded = decode(Some("application/json"), body.as_bytes()).unwrap();
        let batch = decoded.validate_with(InvalidEntries::DeadLetter).unwrap();
        let (t, dl) = (
            template(),
            SubjectTemplate::parse("cmc.invalid.{event_type}").unwrap(),
        );
        let how = Render {
            dead_letter: Some(&dl),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ..Render::new(&t)
        };
        let out = batch.render(&how, "b-1").unwrap();
        assert_eq!(out.invalid, 2);
        let subjects: Vec<_> = out.messages.iter().map(|m| m.subject.as_str()).collect();
        assert_eq!(
            subjects,
            [
                "cmc.deliveries.queued",
                "cmc.invalid.deliveries",
                "cmc.invalid.deliveries",
                "cmc.deliveries.failed"
            ]
        );
        let dead = &out.messages[2];
        assert_eq!(dead.index, 2);
        assert_eq!(
            String::from_utf8(dead.payload.to_vec()).unwrap(),
            r#"{"event_type":"deliveries","server_composition":"pro","index":2,"error":"status is missing","entry":{"to":"a@b","n":2.50}}"#
        );
        let expected = hex::encode(Sha256::digest(
            b"pro\0deliveries\0invalid\0{\"n\":2.50,\"to\":\"a@b\"}".as_slice(),
        ));
        assert_eq!(dead.msg_id, expected);
        let headers: Vec<(String, String)> = out
            .headers(dead)
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "Nats-Msg-Id",
                "Content-Type",
                "Cmc-Event-Type",
                "Cmc-Error",
                "Cmc-Server-Composition",
                "Cmc-Batch-Id",
                "Cmc-Batch-Index",
                "traceparent"
            ]
        );
        assert_eq!(headers[3].1, "status is missing");
        assert_eq!(headers[6].1, "2");
        assert_eq!(headers[7].1, how.traceparent);
        let not_object = String::from_utf8(out.messages[1].payload.to_vec()).unwrap();
        assert!(
            not_object
                .ends_with(r#""error":"must be a JSON object, not a string","entry":"oops"}"#),
            "{not_object}"
        );
        // Valid messages have Cmc-Status and the same traceparent, and no Cmc-Error.
        let valid: Vec<&str> = out
            .headers(&out.messages[0])
            .iter()
            .map(|(n, _)| *n)
            .collect();
        assert!(valid.contains(&"Cmc-Status") && !valid.contains(&"Cmc-Error"));
        assert_eq!(out.wire_size(dead), {
            let block: String = headers
                .iter()
                .map(|(n, v)| format!("{n}: {v}\r\n"))
                .collect();
            format!("NATS/1.0\r\n{block}\r\n").len() + dead.payload.len()
        });
    }

    #[test]
    fn the_minimal_shape_keeps_the_id_and_batch_id_and_a_dead_letters_error() {
        use crate::webhook::InvalidEntries;
        let body = r#"{"event_type":"deliveries","server_composition":"pro","event":{"deliveries":[
            {"status":"queued"},{"to":"a@b"}]}}"#;
        let decoded = decode(Some("application/json"), body.as_bytes()).unwrap();
        let batch = decoded.validate_with(InvalidEntries::DeadLetter).unwrap();
        let (t, dl) = (
            template(),
            SubjectTemplate::parse("cmc.invalid.{event_type}").unwrap(),
        );
        let full = Render {
            dead_letter: Some(&dl),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ..Render::new(&t)
        };
        let minimal = Render {
            shape: HeaderShape::Minimal,
            ..full
        };
        let (f, m) = (
            batch.render(&full, "b-1").unwrap(),
            batch.render(&minimal, "b-1").unwrap(),
        );
        // Same messages, subjects and bodies: only the headers differ.
        assert_eq!(f.messages, m.messages);
        let pairs = |out: &OutgoingBatch, i: usize| -> Vec<(String, String)> {
            out.headers(&out.messages[i])
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        let id = |i: usize| f.messages[i].msg_id.clone();
        assert_eq!(
            pairs(&m, 0),
            [
                ("Nats-Msg-Id".to_owned(), id(0)),
                ("Cmc-Batch-Id".to_owned(), "b-1".to_owned())
            ]
        );
        assert_eq!(
            pairs(&m, 1),
            [
                ("Nats-Msg-Id".to_owned(), id(1)),
                ("Cmc-Batch-Id".to_owned(), "b-1".to_owned()),
                ("Cmc-Error".to_owned(), "status is missing".to_owned())
            ]
        );
        assert_eq!(pairs(&f, 0).len(), 8);
        // The size checked against max_payload follows the shape.
        let block = |out: &OutgoingBatch, i: usize| -> usize {
            let lines: String = pairs(out, i)
                .iter()
                .map(|(n, v)| format!("{n}: {v}\r\n"))
                .collect();
            format!("NATS/1.0\r\n{lines}\r\n").len() + out.messages[i].payload.len()
        };
        for i in 0..2 {
            assert_eq!(m.wire_size(&m.messages[i]), block(&m, i));
            assert!(m.wire_size(&m.messages[i]) < f.wire_size(&f.messages[i]));
        }
    }

    #[test]
    fn a_subject_over_512_bytes_is_an_invalid_entry() {
        use crate::webhook::InvalidEntries;
        let t = SubjectTemplate::parse("cmc.{server_composition}.{status}").unwrap();
        // 128 bytes of status escaped three times over, plus a long server_composition.
        let sc = "s".repeat(130);
        let body = format!(
            r#"{{"event_type":"deliveries","server_composition":"{sc}","event":{{"deliveries":[{{"status":"ok"}},{{"status":"{}"}}]}}}}"#,
            ".".repeat(128)
        );
        let decoded = decode(Some("application/json"), body.as_bytes()).unwrap();
        let batch = decoded.validate().unwrap();
        let err = batch.render(&Render::new(&t), "b").unwrap_err();
        assert_eq!(err.index(), Some(1));
        assert!(err.to_string().contains("over the limit of 512"), "{err}");

        let dl = SubjectTemplate::parse("cmc.invalid.{event_type}").unwrap();
        let how = Render {
            dead_letter: Some(&dl),
            ..Render::new(&t)
        };
        let batch = decoded.validate_with(InvalidEntries::DeadLetter).unwrap();
        let out = batch.render(&how, "b").unwrap();
        assert_eq!(out.invalid, 1);
        assert_eq!(out.messages[1].subject, "cmc.invalid.deliveries");
        assert!(out
            .messages
            .iter()
            .all(|m| m.subject.len() <= MAX_SUBJECT_BYTES));

        // A dead-letter subject that is itself too long refuses the request.
        let long_dl = SubjectTemplate::parse("cmc.invalid.{server_composition}").unwrap();
        let sc = "本".repeat(200);
        let body = format!(
            r#"{{"event_type":"deliveries","server_composition":"{sc}","event":{{"deliveries":[{{}}]}}}}"#
        );
        let decoded = decode(Some("application/json"), body.as_bytes()).unwrap();
        let how = Render {
            dead_letter: Some(&long_dl),
            ..Render::new(&t)
        };
        let err = decoded
            .validate_with(InvalidEntries::DeadLetter)
            .unwrap()
            .render(&how, "b")
            .unwrap_err();
        assert_eq!(err.index(), None);
    }

    pub(super) fn render_reference(
        this: &Batch<'_>,
        how: &Render<'_>,
        batch_id: &str,
    ) -> Result<OutgoingBatch, PayloadError> {
        let event_type = this.event_type.as_str();
        let sc = this.server_composition.as_str();
        let identity = |extra: Option<&str>| {
            let mut h = Sha256::new();
            h.update(sc.as_bytes());
            h.update([0]);
            h.update(event_type.as_bytes());
            h.update([0]);
            if let Some(extra) = extra {
                h.update(extra.as_bytes());
                h.update([0]);
            }
            h
        };
        let id_prefix = identity(None);
        let mut scratch = Vec::new();
        let mut canonical = CanonicalOrder::default();
        let mut created_unparsed = 0;
        let mut messages = Vec::with_capacity(this.entries.len() + this.invalid.len());
        // Entries whose subject turned out too long, dead-lettered below.
        let mut too_long = Vec::new();
        for entry in &this.entries {
            let status = entry.status.as_ref().map_or(NO_STATUS, |s| s.as_str());
            let status_name = if this.event_type.is_bounces() {
                bounce_status_name(status)
            } else {
                status
            };
            let subject = how.template.render(&SubjectValues {
                event_type,
                status,
                status_name,
                server_composition: sc,
            });
            if subject.len() > MAX_SUBJECT_BYTES {
                let error = format!(
                    "its subject would be {} bytes long, over the limit of {MAX_SUBJECT_BYTES}",
                    subject.len()
                );
                if how.dead_letter.is_none() {
                    return Err(PayloadError::invalid_entry(entry.index, error));
                }
                too_long.push(InvalidEntry {
                    index: entry.index,
                    error,
                    value: Json::Object(entry.fields.clone()),
                });
                continue;
            }

            scratch.clear();
            canonical.write(&mut scratch, &entry.fields);
            let mut hasher = id_prefix.clone();
            hasher.update(&scratch);
            let msg_id = lower_hex(&hasher.finalize());

            let mut payload = Vec::with_capacity(64 + sc.len() + 64 * entry.fields.0.len());
            payload.extend_from_slice(b"{\"event_type\":");
            write_string(&mut payload, event_type);
            payload.extend_from_slice(b",\"server_composition\":");
            write_string(&mut payload, sc);
            let stamp = how.zone.and_then(|zone| {
                let stamp = match entry.fields.get("created") {
                    Some(Json::String(created)) => created_at(created, zone),
                    _ => None,
                };
                if stamp.is_none() {
                    created_unparsed += 1;
                }
                stamp
            });
            if let Some(stamp) = &stamp {
                payload.extend_from_slice(b",\"created_at\":");
                write_string(&mut payload, stamp);
            }
            for (key, value) in &entry.fields.0 {
                if ADDED_FIELDS.contains(&key.as_ref()) || (stamp.is_some() && key == CREATED_AT) {
                    continue;
                }
                payload.push(b',');
                write_string(&mut payload, key);
                payload.push(b':');
                write_compact(&mut payload, value);
            }
            payload.push(b'}');

            messages.push(Outgoing {
                subject,
                payload: Bytes::from(payload),
                msg_id,
                status_header: header_value(status),
                error: None,
                index: entry.index,
            });
        }

        let invalid = this.invalid.len() + too_long.len();
        if invalid > 0 {
            let template = how.dead_letter.ok_or_else(|| {
                // Only dead-letter validation keeps invalid entries; reaching this is a bug of
                // the caller, answered as the first invalid entry.
                let first = &this.invalid[0];
                PayloadError::invalid_entry(first.index, first.error.clone())
            })?;
            let subject = template.render(&SubjectValues {
                event_type,
                status: NO_STATUS,
                status_name: NO_STATUS,
                server_composition: sc,
            });
            if subject.len() > MAX_SUBJECT_BYTES {
                return Err(PayloadError::invalid(format!(
                    "the dead-letter subject would be {} bytes long, over the limit of {MAX_SUBJECT_BYTES}",
                    subject.len()
                )));
            }
            let dead_prefix = identity(Some("invalid"));
            for entry in this.invalid.iter().chain(&too_long) {
                scratch.clear();
                write_canonical(&mut scratch, &entry.value);
                let mut hasher = dead_prefix.clone();
                hasher.update(&scratch);
                let msg_id = lower_hex(&hasher.finalize());

                let mut payload = Vec::with_capacity(128 + sc.len() + entry.error.len());
                payload.extend_from_slice(b"{\"event_type\":");
                write_string(&mut payload, event_type);
                payload.extend_from_slice(b",\"server_composition\":");
                write_string(&mut payload, sc);
                payload
                    .extend_from_slice(format!(",\"index\":{},\"error\":", entry.index).as_bytes());
                write_string(&mut payload, &entry.error);
                payload.extend_from_slice(b",\"entry\":");
                write_compact(&mut payload, &entry.value);
                payload.push(b'}');

                messages.push(Outgoing {
                    subject: subject.clone(),
                    payload: Bytes::from(payload),
                    msg_id,
                    status_header: String::new(),
                    error: Some(header_value(&entry.error)),
                    index: entry.index,
                });
            }
            // Entry order on the bus, as for any batch.
            messages.sort_by_key(|m| m.index);
        }
        Ok(OutgoingBatch {
            batch_id: batch_id.to_owned(),
            event_type_header: header_value(event_type),
            server_composition_header: header_value(sc),
            traceparent: how.traceparent.to_owned(),
            shape: how.shape,
            messages,
            created_unparsed,
            invalid,
        })
    }

    /// A JSON string for `text`: as `serde_json` writes it, or with every character that is
    /// not alphanumeric ASCII written as a `\uXXXX` escape (as CMC writes `<` and `>`).
    fn json_text(text: &str, escape_all: bool) -> String {
        if !escape_all {
            return serde_json::to_string(text).unwrap();
        }
        let mut out = String::from("\"");
        for unit in text.encode_utf16() {
            match char::from_u32(u32::from(unit)) {
                Some(c) if c.is_ascii_alphanumeric() => out.push(c),
                _ => out.push_str(&format!("\\u{unit:04X}")),
            }
        }
        out.push('"');
        out
    }

    fn text_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{0,12}",
            "[\\x00-\\x1f\"\\\\<>/ a\u{7f}\u{e9}\u{672c}]{0,12}",
            Just("queued".to_owned()),
        ]
    }

    fn value_strategy() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            (text_strategy(), any::<bool>()).prop_map(|(t, e)| json_text(&t, e)),
            prop_oneof![
                "-?(0|[1-9][0-9]{0,3})",
                "-?(0|[1-9][0-9]{0,2})\\.[0-9]{1,3}",
                "[1-9]e-?[0-9]"
            ],
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
        ];
        leaf.prop_recursive(3, 12, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|items| format!("[ {} ]", items.join(" , "))),
                prop::collection::vec((key_strategy(), inner), 0..4).prop_map(|members| {
                    let members: Vec<String> = members
                        .into_iter()
                        .map(|(k, v)| format!("{k}:{v}"))
                        .collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        })
    }

    fn key_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            prop_oneof![
                Just("status"),
                Just("event_type"),
                Just("server_composition"),
                Just("created_at"),
                Just("created"),
                Just("messageId"),
                Just("b"),
                Just("a"),
            ]
            .prop_map(|k| format!("{k:?}")),
            (text_strategy(), any::<bool>()).prop_map(|(t, e)| json_text(&t, e)),
        ]
    }

    fn entry_text_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => prop::collection::vec(
                prop_oneof![
                    3 => (key_strategy(), value_strategy()),
                    1 => (Just("\"status\"".to_owned()), prop_oneof![
                        (text_strategy(), any::<bool>()).prop_map(|(t, e)| json_text(&t, e)),
                        Just("7".to_owned()),
                        Just("\"2\"".to_owned()),
                    ]),
                    1 => (Just("\"created\"".to_owned()), prop_oneof![
                        Just("\"2023-01-25 14:03:06\"".to_owned()),
                        Just("\"2024-03-10 02:30:00\"".to_owned()),
                        Just("\"not a time\"".to_owned()),
                        Just("3".to_owned()),
                    ]),
                ],
                0..10,
            )
            .prop_map(|members| {
                let members: Vec<String> =
                    members.into_iter().map(|(k, v)| format!("{k} : {v}")).collect();
                format!("{{ {} }}", members.join(", "))
            }),
            1 => value_strategy(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// The renderer gives exactly what the one it replaced gave (kept above as
        /// `render_reference`): subjects, bodies, ids, headers, errors, for any entries, both
        /// validation modes, with and without a zone.
        #[test]
        fn render_matches_the_reference_renderer(
            entries in prop::collection::vec(entry_text_strategy(), 0..12),
            event_type in prop_oneof![Just("deliveries"), Just("bounces"), Just("blocks")],
            sc in prop_oneof![Just("pro".to_owned()), Just("本番 x".to_owned()), Just("s".repeat(200))],
            dead_letter in any::<bool>(),
            zone in prop_oneof![Just(None), Just(Some("Asia/Tokyo")), Just(Some("America/New_York"))],
            long_template in any::<bool>(),
        ) {
            let body = format!(
                r#"{{"event_type":"{event_type}","server_composition":{},"event":{{"{event_type}":[{}]}}}}"#,
                serde_json::to_string(&sc).unwrap(),
                entries.join(",")
            );
            let decoded = decode(Some("application/json"), body.as_bytes()).unwrap();
            let mode = if dead_letter {
                crate::webhook::InvalidEntries::DeadLetter
            } else {
                crate::webhook::InvalidEntries::Reject
            };
            let Ok(batch) = decoded.validate_with(mode) else {
                return Ok(());
            };
            let t = if long_template {
                SubjectTemplate::parse("cmc.{server_composition}.{status_name}.{status}").unwrap()
            } else {
                template()
            };
            let dl = SubjectTemplate::parse("cmc.invalid.{event_type}").unwrap();
            let tz = zone.map(|z| TimeZone::get(z).unwrap());
            let how = Render {
                dead_letter: dead_letter.then_some(&dl),
                zone: tz.as_ref(),
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ..Render::new(&t)
            };
            prop_assert_eq!(batch.render(&how, "b-1"), render_reference(&batch, &how, "b-1"));
        }
    }

    #[test]
    fn lower_hex_is_hex_encode() {
        let digest = Sha256::digest(b"x");
        assert_eq!(lower_hex(&digest), hex::encode(digest));
        let all: Vec<u8> = (0..=255).collect();
        for digest in all.chunks(32) {
            assert_eq!(lower_hex(digest), hex::encode(digest));
        }
    }

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

    fn entry_strategy() -> impl Strategy<Value = String> {
        (
            prop_oneof!["queued", "succeeded", "failed", "deferred"],
            "\\PC{0,30}",
            any::<i64>(),
        )
            .prop_map(|(status, text, n)| {
                serde_json::json!({"status": status, "subject": text, "n": n, "to": "a@b"})
                    .to_string()
            })
    }

    proptest! {
        #[test]
        fn n_entries_make_n_messages_with_valid_subjects(entries in prop::collection::vec(entry_strategy(), 0..40), form in any::<bool>()) {
            let event = format!(r#"{{"deliveries":[{}]}}"#, entries.join(","));
            let out = if form {
                split("application/x-www-form-urlencoded", &format!("event_type=deliveries&server_composition=p&event={}", urlencode(&event)))
            } else {
                split("application/json", &format!(r#"{{"event_type":"deliveries","server_composition":"p","event":{event}}}"#))
            };
            prop_assert_eq!(out.messages.len(), entries.len());
            for (i, m) in out.messages.iter().enumerate() {
                prop_assert_eq!(m.index, i);
                prop_assert!(m.subject.starts_with("cmc.deliveries."));
                prop_assert_eq!(m.subject.split('.').count(), 3);
                let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                let original: serde_json::Value = serde_json::from_str(&entries[i]).unwrap();
                prop_assert_eq!(&body["subject"], &original["subject"]);
                prop_assert_eq!(&body["n"], &original["n"]);
            }
        }
    }
}
