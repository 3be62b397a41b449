//! Step 2: the rules of a valid batch (SPEC §1), all-or-nothing, into typed values.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::decode::{truncate, Decoded, Param};
use super::json::{self, raw_kind, Json, Members};
use super::PayloadError;
use crate::subject::MAX_STATUS_BYTES;

/// What happens to a request whose entries are not all valid (`validation.invalid_entries`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidEntries {
    /// All-or-nothing: the request is refused (`422`) and nothing of it is published.
    #[default]
    Reject,
    /// Each invalid entry goes out as one message on the dead-letter subject; the valid ones
    /// go out as usual.
    DeadLetter,
}

/// A well-formed `event_type`: 1–64 characters of `[a-z0-9_]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventType(String);

impl EventType {
    pub fn parse(value: &str) -> Result<Self, PayloadError> {
        let ok = (1..=64).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(EventType(value.to_owned()))
        } else {
            Err(PayloadError::invalid(format!(
                "event_type {:?} is not a token of 1 to 64 characters [a-z0-9_]",
                truncate(value, 100)
            )))
        }
    }

    /// Whether entries of this type must carry a `status` (CMC's documented types).
    fn requires_status(&self) -> bool {
        matches!(self.0.as_str(), "deliveries" | "bounces")
    }

    pub fn is_bounces(&self) -> bool {
        self.0 == "bounces"
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An entry's status as a subject token's source text: a string, or an integer's digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status(String);

impl Status {
    /// Parses the `status` field of an entry; `Ok(None)` when absent (or null) and optional.
    fn from_field(value: Option<&Json<'_>>, required: bool) -> Result<Option<Status>, String> {
        let text = match value {
            None if required => return Err("status is missing".into()),
            None => return Ok(None),
            Some(Json::Null) if required => return Err("status is null".into()),
            Some(Json::Null) => return Ok(None),
            Some(Json::String(s)) => s.as_ref(),
            Some(Json::Number(n)) => {
                let digits = n.strip_prefix('-').unwrap_or(n);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("status {n} is not an integer"));
                }
                n
            }
            Some(other) => {
                return Err(format!(
                    "status must be a string or an integer, not {}",
                    other.kind()
                ))
            }
        };
        Status::parse(text).map(Some)
    }

    /// Any non-empty string of at most [`MAX_STATUS_BYTES`] bytes is a status (SPEC §1),
    /// whatever its characters: dots, wildcards, spaces, CR LF, NUL and non-ASCII are escaped
    /// where the status is used (subject token, `Cmc-Status`), never a reason to refuse.
    pub fn parse(text: &str) -> Result<Status, String> {
        if text.is_empty() {
            return Err("status is empty".into());
        }
        if text.len() > MAX_STATUS_BYTES {
            return Err(format!(
                "status is {} bytes long, over the limit of {MAX_STATUS_BYTES}",
                text.len()
            ));
        }
        Ok(Status(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One entry of a valid batch: all of its fields, verbatim and in order, borrowing from the
/// request's `event` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The entry's 0-based position in the request.
    pub index: usize,
    pub fields: Members<'a, Json<'a>>,
    pub status: Option<Status>,
}

/// A request that passed every check: nothing in it can be refused any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch<'a> {
    pub event_type: EventType,
    pub server_composition: String,
    pub entries: Vec<Entry<'a>>,
    /// Entries that broke a rule, in entry order; only ever non-empty in dead-letter mode.
    pub invalid: Vec<InvalidEntry<'a>>,
}

/// An entry that broke a rule of SPEC §1, kept with the reason for the dead-letter subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidEntry<'a> {
    /// The entry's 0-based position in the request.
    pub index: usize,
    /// What is wrong with it, for a human.
    pub error: String,
    /// The entry as sent: any JSON value.
    pub value: Json<'a>,
}

impl Decoded {
    /// Checks the whole request, all-or-nothing: the first problem found is returned, and
    /// nothing else.
    pub fn validate(&self) -> Result<Batch<'_>, PayloadError> {
        self.validate_with(InvalidEntries::Reject)
    }

    /// Checks the whole request. With [`InvalidEntries::DeadLetter`], a request that is
    /// well-formed as a whole keeps its invalid entries in [`Batch::invalid`] instead of being
    /// refused; problems of the request itself are refused in both modes.
    pub fn validate_with(&self, mode: InvalidEntries) -> Result<Batch<'_>, PayloadError> {
        self.validate_within(mode, usize::MAX)
    }

    /// [`Decoded::validate_with`], refusing an `event` whose member arrays hold more than
    /// `max_entries` elements (`server.max_entries`) before any entry is built.
    pub fn validate_within(
        &self,
        mode: InvalidEntries,
        max_entries: usize,
    ) -> Result<Batch<'_>, PayloadError> {
        let event_type = EventType::parse(required_text("event_type", &self.event_type)?)?;
        let server_composition = required_text("server_composition", &self.server_composition)?;
        if server_composition.is_empty() {
            return Err(PayloadError::invalid("server_composition is empty"));
        }
        if self.event_empty {
            return Err(PayloadError::invalid("event is empty"));
        }
        let event = self
            .event
            .as_deref()
            .ok_or_else(|| PayloadError::invalid("event is missing"))?;
        if !event.get().starts_with('{') {
            return Err(PayloadError::invalid(format!(
                "event must be a JSON object, not {}",
                raw_kind(event)
            )));
        }
        // One pass over `event`: the array under the event_type key is read straight into
        // entries; other members are skipped; duplicate keys are refused.
        let name = event_type.as_str();
        // One linear pass tells both limits before anything is built.
        let shape = json::Shape::of(event.get());
        if shape.member_array_elements > max_entries {
            return Err(PayloadError::TooManyEntries { limit: max_entries });
        }
        // `event` > array > entry > fields: three levels above an entry field's own nesting.
        let deepest = shape.max_nesting;
        if deepest > json::MAX_DEPTH + 3 {
            return Err(PayloadError::MalformedJson(format!(
                "event is nested {deepest} levels deep; entry fields may nest at most {} levels",
                json::MAX_DEPTH
            )));
        }
        // `event` was checked by `serde_json` when it was decoded: read in one pass, and
        // through `serde_json` again only when that pass finds something to refuse, so that
        // the refusal says what `serde_json` says.
        let parsed = match json::member_array_validated(event.get(), name) {
            Some(found) => found.map(|array| {
                array.map(|elements| {
                    elements
                        .into_iter()
                        .map(|element| match element {
                            Ok(fields) => Item::Object(fields),
                            Err(kind) => Item::Other(kind),
                        })
                        .collect()
                })
            }),
            None => event_items(event.get(), name)?,
        };
        let items = match parsed {
            None => {
                return Err(PayloadError::invalid(format!(
                    "event has no {name:?} member (the event_type)"
                )))
            }
            Some(Err(kind)) => {
                return Err(PayloadError::invalid(format!(
                    "event.{name} must be an array, not {kind}"
                )))
            }
            Some(Ok(items)) => items,
        };
        let required = event_type.requires_status();
        let mut entries = Vec::with_capacity(items.len());
        let mut invalid = Vec::new();
        // Entries that are not objects were read by kind only (the common path keeps no
        // copy); their text is read again, once, when they are dead-lettered.
        let mut not_objects = Vec::new();
        for (index, item) in items.into_iter().enumerate() {
            let fields = match item {
                Item::Object(fields) => fields,
                Item::Other(kind) => {
                    let error = format!("must be a JSON object, not {kind}");
                    if mode == InvalidEntries::Reject {
                        return Err(PayloadError::invalid_entry(index, error));
                    }
                    not_objects.push(invalid.len());
                    invalid.push(InvalidEntry {
                        index,
                        error,
                        value: Json::Null,
                    });
                    continue;
                }
            };
            match Status::from_field(fields.get("status"), required) {
                Ok(status) => entries.push(Entry {
                    index,
                    fields,
                    status,
                }),
                Err(error) if mode == InvalidEntries::Reject => {
                    return Err(PayloadError::invalid_entry(index, error))
                }
                Err(error) => invalid.push(InvalidEntry {
                    index,
                    error,
                    value: Json::Object(fields),
                }),
            }
        }
        if !not_objects.is_empty() {
            let raw = raw_items(event.get(), name)?;
            for at in not_objects {
                let entry = &mut invalid[at];
                let text = raw.get(entry.index).copied().ok_or_else(|| {
                    PayloadError::MalformedJson("event changed between two reads".into())
                })?;
                entry.value = Json::from_raw(text).map_err(|e| {
                    PayloadError::MalformedJson(format!("entry {}: {e}", entry.index))
                })?;
            }
        }
        Ok(Batch {
            event_type,
            server_composition: server_composition.to_owned(),
            entries,
            invalid,
        })
    }
}

/// The array under `name` in the `event` object, read through `serde_json` value by value.
fn event_items<'a>(event: &'a str, name: &str) -> Result<EventItems<'a>, PayloadError> {
    let mut reader = serde_json::Deserializer::from_str(event);
    EventSeed { name }
        .deserialize(&mut reader)
        .and_then(|parsed| reader.end().map(|()| parsed))
        .map_err(|e| PayloadError::MalformedJson(format!("event is not valid JSON: {e}")))
}

/// The raw text of every element of the array under `name` in the `event` object.
fn raw_items<'a>(event: &'a str, name: &str) -> Result<Vec<&'a RawValue>, PayloadError> {
    struct Seed<'n> {
        name: &'n str,
    }
    impl<'de> Visitor<'de> for Seed<'_> {
        type Value = Vec<&'de RawValue>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut items = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                if key == self.name {
                    items = map.next_value::<Vec<&'de RawValue>>()?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(items)
        }
    }
    let mut reader = serde_json::Deserializer::from_str(event);
    reader
        .deserialize_map(Seed { name })
        .map_err(|e| PayloadError::MalformedJson(format!("event is not valid JSON: {e}")))
}

/// Reads the `event` object: `None` when it has no member `name`, `Some(Err(kind))` when
/// that member is not an array.
struct EventSeed<'a> {
    name: &'a str,
}

type EventItems<'a> = Option<Result<Vec<Item<'a>>, &'static str>>;

impl<'de> DeserializeSeed<'de> for EventSeed<'_> {
    type Value = EventItems<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EventSeed<'_> {
    type Value = EventItems<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = HashSet::new();
        let mut items = None;
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(de::Error::custom(format!(
                    "duplicate key {:?}",
                    truncate(&key, 100)
                )));
            }
            if key == self.name {
                items = Some(map.next_value::<ArrayOrKind>()?.0);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
            seen.insert(key);
        }
        Ok(items)
    }
}

/// An array of items, or the kind of the non-array value found instead.
struct ArrayOrKind<'a>(Result<Vec<Item<'a>>, &'static str>);

/// One element of the entries array: an object, or the kind of what it is instead.
#[derive(Debug, PartialEq, Eq)]
enum Item<'a> {
    Object(Members<'a, Json<'a>>),
    Other(&'static str),
}

/// Consumes the rest of a map or sequence that is only reported by its kind.
fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Implements the scalar `visit_*` methods of a visitor whose value records a kind name.
macro_rules! kinds {
    ($wrap:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($wrap("a boolean"))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($wrap("a number"))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($wrap("a number"))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($wrap("a number"))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($wrap("a string"))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($wrap("null"))
        }
    };
}

impl<'de> Deserialize<'de> for ArrayOrKind<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ArrayOrKind<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            kinds!(|k| ArrayOrKind(Err(k)));
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ArrayOrKind<'de>, A::Error> {
                skip_map(map).map(|()| ArrayOrKind(Err("an object")))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ArrayOrKind<'de>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(16));
                while let Some(item) = seq.next_element::<Item>()? {
                    items.push(item);
                }
                Ok(ArrayOrKind(Ok(items)))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Item<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Item<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            kinds!(Item::Other);
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Item<'de>, A::Error> {
                Members::<Json>::from_map(map).map(Item::Object)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Item<'de>, A::Error> {
                skip_seq(seq).map(|()| Item::Other("an array"))
            }
        }
        deserializer.deserialize_any(V)
    }
}

fn required_text<'a>(name: &str, param: &'a Option<Param>) -> Result<&'a str, PayloadError> {
    match param {
        None => Err(PayloadError::invalid(format!("{name} is missing"))),
        Some(Param::NotText(kind)) => Err(PayloadError::invalid(format!(
            "{name} must be a string, not {kind}"
        ))),
        Some(Param::Text(text)) => Ok(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::decode;

    /// The batch borrows from its decoded request; leaking it keeps the tests short.
    fn validate_json(body: &str) -> Result<Batch<'static>, PayloadError> {
        let decoded = decode(Some("application/json"), body.as_bytes())?;
        Box::leak(Box::new(decoded)).validate()
    }

    fn batch(event_type: &str, entries: &str) -> String {
        format!(
            r#"{{"event_type":"{event_type}","server_composition":"pro","event":{{"{event_type}":{entries}}}}}"#
        )
    }

    fn invalid_at(body: &str) -> (String, Option<usize>) {
        match validate_json(body) {
            Err(PayloadError::Invalid { message, index }) => (message, index),
            other => panic!("expected invalid_payload, got {other:?}"),
        }
    }

    #[test]
    fn event_type_tokens() {
        for ok in [
            "deliveries",
            "bounces",
            "blocks",
            "a",
            "x_1",
            &"a".repeat(64),
        ] {
            assert!(EventType::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Deliveries",
            "a.b",
            "a*",
            ">",
            "a b",
            "本",
            &"a".repeat(65),
        ] {
            assert!(EventType::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn statuses() {
        // Any non-empty string up to 128 bytes: escaping, not refusal, deals with the rest.
        for ok in [
            "queued",
            "2",
            "99",
            "-1",
            "本番",
            "a-b_c%",
            "a.b",
            "*",
            ">",
            "a b",
            " a",
            "a\0",
            "a\t",
            "a.b*> c\r\nX-Injected: 1\0",
            &"x".repeat(MAX_STATUS_BYTES),
            &"本".repeat(MAX_STATUS_BYTES / 3),
        ] {
            assert_eq!(Status::parse(ok).unwrap().as_str(), ok, "{ok:?}");
        }
        for bad in ["", &"x".repeat(MAX_STATUS_BYTES + 1), &"本".repeat(43)] {
            assert!(Status::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn valid_batch_keeps_every_entry() {
        let b = validate_json(&batch(
            "deliveries",
            r#"[{"status":"queued","x":1},{"status":"failed"}]"#,
        ))
        .unwrap();
        assert_eq!(b.event_type.as_str(), "deliveries");
        assert_eq!(b.entries.len(), 2);
        assert_eq!(b.entries[0].status.as_ref().unwrap().as_str(), "queued");
    }

    #[test]
    fn bounce_status_may_be_an_integer() {
        let b = validate_json(&batch("bounces", r#"[{"status":2},{"status":"2"}]"#)).unwrap();
        assert_eq!(b.entries[0].status, b.entries[1].status);
    }

    #[test]
    fn empty_array_is_valid() {
        assert!(validate_json(&batch("deliveries", "[]"))
            .unwrap()
            .entries
            .is_empty());
    }

    #[test]
    fn unknown_event_types_are_routed_and_status_is_optional() {
        let b = validate_json(&batch(
            "blocks",
            r#"[{"a":1},{"status":null},{"status":"x"}]"#,
        ))
        .unwrap();
        assert_eq!(b.entries[0].status, None);
        assert_eq!(b.entries[1].status, None);
        assert!(b.entries[2].status.is_some());
        assert!(validate_json(&batch("opens", r#"[{"a":1}]"#)).is_ok());
    }

    #[test]
    fn bad_entries_are_named_by_index() {
        let long = format!(r#"[{{"status":"{}"}}]"#, "x".repeat(129));
        for (entries, index, needle) in [
            (r#"[{"status":"queued"},1]"#, 1, "not a number"),
            (r#"[{"status":"queued"},{"status":"ok"},null]"#, 2, "null"),
            (r#"[{}]"#, 0, "missing"),
            (r#"[{"status":null}]"#, 0, "null"),
            (r#"[{"status":true}]"#, 0, "boolean"),
            (r#"[{"status":{}}]"#, 0, "object"),
            (r#"[{"status":1.5}]"#, 0, "integer"),
            (r#"[{"status":""}]"#, 0, "empty"),
            (long.as_str(), 0, "129 bytes"),
        ] {
            let (message, at) = invalid_at(&batch("deliveries", entries));
            assert_eq!(at, Some(index), "{entries}");
            assert!(
                message.contains(needle)
                    || (needle == "not a number" && message.contains("number")),
                "{entries}: {message}"
            );
        }
    }

    #[test]
    fn top_level_problems_are_invalid_payload() {
        for body in [
            r#"{"server_composition":"pro","event":{"deliveries":[]}}"#,
            r#"{"event_type":"deliveries","event":{"deliveries":[]}}"#,
            r#"{"event_type":"deliveries","server_composition":"","event":{"deliveries":[]}}"#,
            r#"{"event_type":"deliveries","server_composition":1,"event":{"deliveries":[]}}"#,
            r#"{"event_type":"a.b","server_composition":"pro","event":{"a.b":[]}}"#,
            r#"{"event_type":"deliveries","server_composition":"pro"}"#,
            r#"{"event_type":"deliveries","server_composition":"pro","event":[]}"#,
            r#"{"event_type":"deliveries","server_composition":"pro","event":{"bounces":[]}}"#,
            r#"{"event_type":"deliveries","server_composition":"pro","event":{"deliveries":{}}}"#,
        ] {
            let (_, index) = invalid_at(body);
            assert_eq!(index, None, "{body}");
        }
    }

    #[test]
    fn dead_letter_mode_keeps_invalid_entries_as_sent() {
        let body = batch(
            "deliveries",
            r#"[{"status":"queued"},[1, 2.50,"x"],{"to":"a@b"},{"status":"failed"},7]"#,
        );
        let decoded = decode(Some("application/json"), body.as_bytes()).unwrap();
        let b = decoded.validate_with(InvalidEntries::DeadLetter).unwrap();
        let indices: Vec<usize> = b.entries.iter().map(|e| e.index).collect();
        assert_eq!(indices, [0, 3]);
        let invalid: Vec<(usize, &str, String)> = b
            .invalid
            .iter()
            .map(|i| {
                let mut text = Vec::new();
                json::write_compact(&mut text, &i.value);
                (i.index, i.error.as_str(), String::from_utf8(text).unwrap())
            })
            .collect();
        assert_eq!(
            invalid,
            [
                (
                    1,
                    "must be a JSON object, not an array",
                    r#"[1,2.50,"x"]"#.into()
                ),
                (2, "status is missing", r#"{"to":"a@b"}"#.into()),
                (4, "must be a JSON object, not a number", "7".into()),
            ]
        );
        // The same request, all-or-nothing: refused at the first invalid entry.
        assert_eq!(decoded.validate().unwrap_err().index(), Some(1));
    }

    #[test]
    fn dead_letter_mode_still_refuses_a_malformed_request() {
        for body in [
            r#"{"server_composition":"pro","event":{"deliveries":[1]}}"#,
            r#"{"event_type":"deliveries","server_composition":"pro","event":{"deliveries":{}}}"#,
            r#"{"event_type":"deliveries","server_composition":"","event":{"deliveries":[1]}}"#,
        ] {
            let decoded = decode(Some("application/json"), body.as_bytes()).unwrap();
            let err = decoded
                .validate_with(InvalidEntries::DeadLetter)
                .unwrap_err();
            assert!(
                matches!(err, PayloadError::Invalid { index: None, .. }),
                "{body}"
            );
        }
    }

    #[test]
    fn duplicate_key_in_event_is_malformed_json() {
        let body = r#"{"event_type":"deliveries","server_composition":"pro","event":{"deliveries":[],"deliveries":[]}}"#;
        assert!(matches!(
            validate_json(body),
            Err(PayloadError::MalformedJson(_))
        ));
    }

    /// The one-pass read of `event` gives what `serde_json`'s read gives, and leaves to it
    /// only what it refuses or what is nested too deep.
    mod one_pass {
        use super::super::*;
        use proptest::prelude::*;

        fn scalar() -> impl Strategy<Value = String> {
            prop_oneof![
                "\\PC{0,6}".prop_map(|s| serde_json::to_string(&s).unwrap()),
                Just(r#""\u003Cid\u003E \"[{""#.to_owned()),
                Just("-1.5e3".to_owned()),
                Just("0".to_owned()),
                Just("true".to_owned()),
                Just("null".to_owned()),
            ]
        }

        fn value() -> impl Strategy<Value = String> {
            scalar().prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4)
                        .prop_map(|items| format!("[ {} ]", items.join(" ,"))),
                    prop::collection::vec(
                        (
                            prop_oneof![Just("\"a\""), Just("\"b\""), Just("\"\\u0061\"")],
                            inner
                        ),
                        0..4
                    )
                    .prop_map(|members| {
                        let members: Vec<String> = members
                            .into_iter()
                            .map(|(k, v)| format!("{k}: {v}"))
                            .collect();
                        format!("{{ {} }}", members.join(", "))
                    }),
                ]
            })
        }

        fn event() -> impl Strategy<Value = String> {
            let key = prop_oneof![
                Just("\"deliveries\""),
                Just("\"deliv\\u0065ries\""),
                Just("\"bounces\""),
                Just("\"x\""),
            ];
            let array = prop::collection::vec(value(), 0..5)
                .prop_map(|items| format!("[{}]", items.join(",")));
            prop::collection::vec((key, prop_oneof![3 => array, 1 => value()]), 0..4).prop_map(
                |members| {
                    let members: Vec<String> = members
                        .into_iter()
                        .map(|(k, v)| format!(" {k} :{v} "))
                        .collect();
                    format!(" {{{}}} ", members.join(","))
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]
            #[test]
            fn reads_what_serde_reads(event in event()) {
                let by_serde = event_items(&event, "deliveries");
                match json::member_array_validated(&event, "deliveries") {
                    Some(found) => {
                        let found: EventItems = found.map(|array| {
                            array.map(|elements| {
                                elements
                                    .into_iter()
                                    .map(|e| match e {
                                        Ok(fields) => Item::Object(fields),
                                        Err(kind) => Item::Other(kind),
                                    })
                                    .collect()
                            })
                        });
                        prop_assert_eq!(Ok(found), by_serde);
                    }
                    // Only what serde refuses is left to it here (nothing nests too deep).
                    None => prop_assert!(by_serde.is_err(), "{:?}", by_serde),
                }
            }
        }
    }
}
