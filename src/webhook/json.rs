//! A JSON tree that keeps what CMC sent: object members in their original order (duplicates
//! included) and numbers as their original text.
//!
//! `serde_json::Value` would reorder nothing only with `preserve_order`, and would round numbers
//! through `f64`/`u64` unless `arbitrary_precision` is switched on crate-wide. Both the message
//! body ("every field in its original order with its original values") and the message id
//! ("numbers exactly as they appear in the input") need the original text, so this module lets
//! `serde_json` do all the lexing through [`RawValue`] and only records the pieces.
//!
//! It also writes the two serialisations the service needs: compact JSON in original order for
//! message bodies, and the canonical form (sorted keys, minimal escaping) hashed into
//! `Nats-Msg-Id`. No I/O here.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// One JSON value, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Json {
    Null,
    Bool(bool),
    /// The number's literal text, exactly as in the input (`1`, `-0`, `1.50`, `2e3`).
    Number(Box<str>),
    String(String),
    Array(Vec<Json>),
    Object(Members<Json>),
}

impl Json {
    /// Builds the tree of one raw value; the raw value has already been checked by `serde_json`.
    pub fn from_raw(raw: &RawValue) -> serde_json::Result<Json> {
        let text = raw.get();
        Ok(match text.as_bytes().first() {
            Some(b'{') => Json::Object(serde_json::from_str(text)?),
            Some(b'[') => Json::Array(serde_json::from_str(text)?),
            Some(b'"') => Json::String(serde_json::from_str(text)?),
            Some(b't') => Json::Bool(true),
            Some(b'f') => Json::Bool(false),
            Some(b'n') => Json::Null,
            _ => Json::Number(text.into()),
        })
    }

    /// A short name of the value's type, for error messages.
    pub fn kind(&self) -> &'static str {
        kind_of(self)
    }
}

fn kind_of(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// The type name of a raw value, judged by its first byte, for error messages.
pub fn raw_kind(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw: &RawValue = Deserialize::deserialize(deserializer)?;
        Json::from_raw(raw).map_err(de::Error::custom)
    }
}

/// The members of a JSON object in their original order, duplicates kept.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Members<V>(pub Vec<(String, V)>);

impl<V> Members<V> {
    /// The first key that appears more than once, if any.
    pub fn first_duplicate(&self) -> Option<&str> {
        let mut keys: Vec<&str> = self.0.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        keys.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
    }

    /// The value of the first member called `key`.
    pub fn get(&self, key: &str) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Members<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor<V>(std::marker::PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for MembersVisitor<V> {
            type Value = Members<V>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some((key, value)) = map.next_entry::<String, V>()? {
                    members.push((key, value));
                }
                Ok(Members(members))
            }
        }

        deserializer.deserialize_map(MembersVisitor(std::marker::PhantomData))
    }
}

/// Writes `s` as a JSON string with only `"`, `\` and control characters escaped
/// (`\b \f \n \r \t`, others as `\u00xx` in lowercase hex); everything else raw.
pub fn write_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Writes `value` as compact JSON, members in their original order.
pub fn write_compact(out: &mut Vec<u8>, value: &Json) {
    write_value(out, value, false);
}

/// Writes `value` in canonical form: object keys sorted by their UTF-8 bytes at every level,
/// no whitespace, minimal string escaping, numbers as received.
pub fn write_canonical(out: &mut Vec<u8>, value: &Json) {
    write_value(out, value, true);
}

fn write_value(out: &mut Vec<u8>, value: &Json, sorted: bool) {
    match value {
        Json::Null => out.extend_from_slice(b"null"),
        Json::Bool(true) => out.extend_from_slice(b"true"),
        Json::Bool(false) => out.extend_from_slice(b"false"),
        Json::Number(n) => out.extend_from_slice(n.as_bytes()),
        Json::String(s) => write_string(out, s),
        Json::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item, sorted);
            }
            out.push(b']');
        }
        Json::Object(members) => write_members(out, members.0.iter(), sorted),
    }
}

/// Writes the members of an object in canonical form (see [`write_canonical`]).
pub fn write_canonical_members(out: &mut Vec<u8>, members: &Members<Json>) {
    write_members(out, members.0.iter(), true);
}

/// Writes an object made of `members`, sorted by key when `sorted` (a stable sort, so
/// duplicate keys keep their relative order and the output stays deterministic).
pub fn write_members<'a>(
    out: &mut Vec<u8>,
    members: impl Iterator<Item = &'a (String, Json)>,
    sorted: bool,
) {
    let mut members: Vec<&(String, Json)> = members.collect();
    if sorted {
        members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    }
    out.push(b'{');
    for (i, (key, value)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(out, key);
        out.push(b':');
        write_value(out, value, sorted);
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Json {
        serde_json::from_str(text).unwrap()
    }

    fn canonical(text: &str) -> String {
        let mut out = Vec::new();
        write_canonical(&mut out, &parse(text));
        String::from_utf8(out).unwrap()
    }

    fn compact(text: &str) -> String {
        let mut out = Vec::new();
        write_compact(&mut out, &parse(text));
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn numbers_keep_their_text() {
        assert_eq!(
            compact(r#"[1, -0, 1.50, 2e3, 12345678901234567890123]"#),
            "[1,-0,1.50,2e3,12345678901234567890123]"
        );
    }

    #[test]
    fn canonical_sorts_keys_at_every_level_by_bytes() {
        assert_eq!(
            canonical(r#"{"b": {"z": 1, "a": 2}, "a": [ {"y":1,"x":2} ], "B": null, "é": 1}"#),
            r#"{"B":null,"a":[{"x":2,"y":1}],"b":{"a":2,"z":1},"é":1}"#
        );
    }

    #[test]
    fn compact_keeps_original_order_and_duplicates() {
        assert_eq!(
            compact(r#"{"b":1, "a":2, "b":3}"#),
            r#"{"b":1,"a":2,"b":3}"#
        );
    }

    #[test]
    fn strings_are_escaped_minimally() {
        assert_eq!(
            canonical(r#""\u003Cid@x\u003E \" \\ \/ \b\f\n\r\t \u0001 \u001F \u007f 本""#),
            "\"<id@x> \\\" \\\\ / \\b\\f\\n\\r\\t \\u0001 \\u001f \u{7f} 本\""
        );
    }

    #[test]
    fn duplicates_are_found() {
        let m: Members<Json> = serde_json::from_str(r#"{"a":1,"b":2,"a":3}"#).unwrap();
        assert_eq!(m.first_duplicate(), Some("a"));
        let m: Members<Json> = serde_json::from_str(r#"{"a":1,"b":2}"#).unwrap();
        assert_eq!(m.first_duplicate(), None);
    }

    #[test]
    fn kinds_are_named() {
        for (text, kind) in [
            ("null", "null"),
            ("true", "a boolean"),
            ("1", "a number"),
            ("\"x\"", "a string"),
            ("[]", "an array"),
            ("{}", "an object"),
        ] {
            assert_eq!(parse(text).kind(), kind);
            let raw: &RawValue = serde_json::from_str(text).unwrap();
            assert_eq!(raw_kind(raw), kind);
        }
    }
}
