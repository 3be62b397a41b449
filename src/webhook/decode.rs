//! Step 1: the two envelopes CMC uses, decoded into the same [`Decoded`] parameters.
//!
//! Form-urlencoded (CMC's default) carries `event` as a JSON string; JSON carries it as a
//! nested object (or, leniently, as a string). A parameter given twice is refused in both, so
//! no two parsers can ever read one request differently.

use std::collections::HashSet;

use serde_json::value::RawValue;

use super::json::{raw_kind, Members};
use super::PayloadError;

/// The two media types the webhook accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Form,
}

impl Encoding {
    /// Chooses the encoding from a `Content-Type` value, ignoring parameters such as `charset`.
    pub fn from_content_type(content_type: Option<&str>) -> Result<Self, PayloadError> {
        let Some(value) = content_type else {
            return Err(PayloadError::UnsupportedMediaType(
                "Content-Type is missing: send application/x-www-form-urlencoded or application/json".into(),
            ));
        };
        let media = value.split(';').next().unwrap_or("").trim();
        if media.eq_ignore_ascii_case("application/json") {
            Ok(Encoding::Json)
        } else if media.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            Ok(Encoding::Form)
        } else {
            Err(PayloadError::UnsupportedMediaType(format!(
                "unsupported media type {:?}: send application/x-www-form-urlencoded or application/json",
                truncate(media, 100)
            )))
        }
    }
}

/// A top-level parameter as received: text, or (JSON only) a value of another type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    Text(String),
    /// A JSON value that is not a string; holds the name of its type for the error message.
    NotText(&'static str),
}

/// The top-level parameters of one request, decoded but not yet validated.
#[derive(Debug)]
pub struct Decoded {
    pub(super) event_type: Option<Param>,
    pub(super) server_composition: Option<Param>,
    /// The request's `api_key`, consumed here and never forwarded.
    api_key: Option<Param>,
    /// The `event` parameter, syntactically valid JSON of any type.
    pub(super) event: Option<Box<RawValue>>,
    /// `event` was given but empty.
    pub(super) event_empty: bool,
}

impl Decoded {
    /// The `api_key` parameter, when it was sent as text.
    pub fn api_key(&self) -> Option<&str> {
        match &self.api_key {
            Some(Param::Text(key)) => Some(key),
            _ => None,
        }
    }
}

/// Decodes a body of the given `Content-Type`.
pub fn decode(content_type: Option<&str>, body: &[u8]) -> Result<Decoded, PayloadError> {
    match Encoding::from_content_type(content_type)? {
        Encoding::Json => decode_json(body),
        Encoding::Form => decode_form(body),
    }
}

fn decode_json(body: &[u8]) -> Result<Decoded, PayloadError> {
    // A body that is a valid JSON object is read in one pass, straight into its members. Only
    // when that fails is it read again, value first, to say what is wrong with it: reading
    // every body twice was an eighth of the decoding.
    let members: Members<&RawValue> = match serde_json::from_slice(body) {
        Ok(members) => members,
        Err(_) => top_level_members(body)?,
    };
    if let Some(key) = members.first_duplicate() {
        return Err(PayloadError::MalformedJson(format!(
            "duplicate key {:?} in the top-level object",
            truncate(key, 100)
        )));
    }
    let param = |name: &str| -> Result<Option<Param>, PayloadError> {
        members
            .get(name)
            .map(|raw| json_param(name, raw))
            .transpose()
    };
    let (event, event_empty) = match members.get("event") {
        None => (None, false),
        Some(raw) if raw.get().starts_with('"') => {
            let text: String = serde_json::from_str(raw.get()).map_err(|e| {
                PayloadError::MalformedJson(format!("event is not a valid JSON string: {e}"))
            })?;
            let event = parse_event(&text)?;
            let empty = event.is_none();
            (event, empty)
        }
        Some(raw) => (Some((*raw).to_owned()), false),
    };
    Ok(Decoded {
        event_type: param("event_type")?,
        server_composition: param("server_composition")?,
        api_key: param("api_key")?,
        event,
        event_empty,
    })
}

/// The members of the top-level object, read as a value first so that a body that is not
/// JSON and one that is JSON but not an object are told apart.
fn top_level_members(body: &[u8]) -> Result<Members<'_, &RawValue>, PayloadError> {
    let raw: &RawValue = serde_json::from_slice(body)
        .map_err(|e| PayloadError::MalformedJson(format!("the body is not valid JSON: {e}")))?;
    if !raw.get().starts_with('{') {
        return Err(PayloadError::invalid(format!(
            "the body must be a JSON object, not {}",
            raw_kind(raw)
        )));
    }
    serde_json::from_str(raw.get())
        .map_err(|e| PayloadError::MalformedJson(format!("the body is not valid JSON: {e}")))
}

fn json_param(name: &str, raw: &RawValue) -> Result<Param, PayloadError> {
    if raw.get().starts_with('"') {
        serde_json::from_str(raw.get())
            .map(Param::Text)
            .map_err(|e| PayloadError::MalformedJson(format!("{name} is not a valid string: {e}")))
    } else {
        Ok(Param::NotText(raw_kind(raw)))
    }
}

/// Parses the text of `event`; `None` when it is empty, which validation reports as a
/// required field left empty (422) rather than as malformed JSON.
fn parse_event(text: &str) -> Result<Option<Box<RawValue>>, PayloadError> {
    if text.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(text)
        .map(Some)
        .map_err(|e| PayloadError::MalformedJson(format!("event is not valid JSON: {e}")))
}

fn decode_form(body: &[u8]) -> Result<Decoded, PayloadError> {
    let mut decoded = Decoded {
        event_type: None,
        server_composition: None,
        api_key: None,
        event: None,
        event_empty: false,
    };
    let mut event_text = None;
    // A set, not a list: a hostile body may hold a million fields.
    let mut seen: HashSet<String> = HashSet::new();
    for pair in body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &[][..]),
        };
        let name = form_component(raw_name, None)?;
        if seen.contains(&name) {
            return Err(PayloadError::MalformedForm(format!(
                "form field {:?} is given more than once",
                truncate(&name, 100)
            )));
        }
        // Every value is decoded, unknown fields' too: a body with a broken escape anywhere
        // is not a valid form, whatever the field.
        let value = form_component(raw_value, Some(&name))?;
        let slot = match name.as_str() {
            "event_type" => Some(&mut decoded.event_type),
            "server_composition" => Some(&mut decoded.server_composition),
            "api_key" => Some(&mut decoded.api_key),
            "event" => None,
            _ => {
                seen.insert(name);
                continue;
            }
        };
        match slot {
            Some(slot) => *slot = Some(Param::Text(value)),
            None => event_text = Some(value),
        }
        seen.insert(name);
    }
    if let Some(text) = event_text {
        decoded.event = parse_event(&text)?;
        decoded.event_empty = decoded.event.is_none();
    }
    Ok(decoded)
}

/// Decodes one form component strictly: `+` is a space, `%XX` a byte, and the result must be
/// UTF-8. Lenient decoders (such as the `form_urlencoded` crate's) replace broken escapes and
/// invalid UTF-8 silently; a webhook must refuse them instead of publishing altered data.
pub fn form_component(raw: &[u8], field: Option<&str>) -> Result<String, PayloadError> {
    let what = || match field {
        Some(name) => format!("the value of form field {:?}", truncate(name, 100)),
        None => "a form field name".to_owned(),
    };
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = raw.get(i + 1..i + 3).and_then(|h| {
                    let h = std::str::from_utf8(h).ok()?;
                    u8::from_str_radix(h, 16)
                        .ok()
                        .filter(|_| !h.starts_with('+'))
                });
                let Some(byte) = hex else {
                    return Err(PayloadError::MalformedForm(format!(
                        "{} has a broken percent-encoding at byte {i}",
                        what()
                    )));
                };
                out.push(byte);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map_err(|_| PayloadError::MalformedForm(format!("{} is not valid UTF-8", what())))
}

/// Cuts a client-supplied string for an error message, on a character boundary.
pub(super) fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: &str = "application/x-www-form-urlencoded";
    const JSON: &str = "application/json";

    fn text(p: &Option<Param>) -> Option<&str> {
        match p {
            Some(Param::Text(t)) => Some(t),
            _ => None,
        }
    }

    #[test]
    fn media_types_ignore_parameters_and_case() {
        use Encoding::*;
        for (ct, enc) in [
            ("application/json", Json),
            ("application/json; charset=UTF-8", Json),
            ("Application/JSON", Json),
            ("application/x-www-form-urlencoded;charset=utf-8", Form),
        ] {
            assert_eq!(Encoding::from_content_type(Some(ct)), Ok(enc), "{ct}");
        }
        for ct in [None, Some("text/plain"), Some("application/xml"), Some("")] {
            assert!(matches!(
                Encoding::from_content_type(ct),
                Err(PayloadError::UnsupportedMediaType(_))
            ));
        }
    }

    #[test]
    fn spec_form_example_decodes() {
        let body = "server_composition=pro&event_type=deliveries&event=%7B%22deliveries%22%3A%5B%7B%22created%22%3A%222015-12-14+10%3A53%3A52%22%2C%22to%22%3A%22to1%40example.com%22%2C%22messageId%22%3A%22%5Cu003C823cb160%40node1%5Cu003E%22%2C%22status%22%3A%22queued%22%7D%5D%7D";
        let d = decode(Some(FORM), body.as_bytes()).unwrap();
        assert_eq!(text(&d.event_type), Some("deliveries"));
        assert_eq!(text(&d.server_composition), Some("pro"));
        assert_eq!(d.api_key(), None);
        let event = d.event.unwrap();
        assert!(event.get().contains(r#""created":"2015-12-14 10:53:52""#));
    }

    #[test]
    fn form_refuses_repeats_broken_escapes_and_bad_utf8() {
        for body in [
            &b"event_type=a&event_type=b"[..],
            b"x=1&x=2",
            b"event_type=%zz",
            b"event_type=%4",
            b"event_type=%+1",
            b"event_type=%FF",
            b"event_type=\xff",
        ] {
            assert!(
                matches!(
                    decode(Some(FORM), body),
                    Err(PayloadError::MalformedForm(_))
                ),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn form_event_must_be_json() {
        let err = decode(Some(FORM), b"event_type=a&event=%7Bnope").unwrap_err();
        assert!(matches!(err, PayloadError::MalformedJson(m) if m.contains("event")));
    }

    #[test]
    fn json_event_may_be_a_string() {
        let body = r#"{"event_type":"deliveries","server_composition":"pro","api_key":"k","event":"{\"deliveries\":[]}"}"#;
        let d = decode(Some(JSON), body.as_bytes()).unwrap();
        assert_eq!(d.api_key(), Some("k"));
        assert_eq!(d.event.unwrap().get(), r#"{"deliveries":[]}"#);
    }

    #[test]
    fn json_refuses_duplicates_and_non_objects() {
        let dup = r#"{"event_type":"a","event_type":"b"}"#;
        assert!(matches!(
            decode(Some(JSON), dup.as_bytes()),
            Err(PayloadError::MalformedJson(_))
        ));
        assert!(matches!(
            decode(Some(JSON), b"[1]"),
            Err(PayloadError::Invalid { .. })
        ));
        assert!(matches!(
            decode(Some(JSON), b"{\"a\":"),
            Err(PayloadError::MalformedJson(_))
        ));
        assert!(matches!(
            decode(Some(JSON), b"\xff"),
            Err(PayloadError::MalformedJson(_))
        ));
    }

    #[test]
    fn json_non_string_params_are_kept_as_their_kind() {
        let d = decode(Some(JSON), br#"{"event_type":1,"server_composition":null}"#).unwrap();
        assert_eq!(d.event_type, Some(Param::NotText("a number")));
        assert_eq!(d.server_composition, Some(Param::NotText("null")));
    }

    /// The one-pass read of a JSON body accepts only what the two-pass read accepts, with the
    /// same members (and the two-pass read is what every failure goes through).
    mod one_pass {
        use super::super::*;
        use proptest::prelude::*;

        fn scalar() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("null".to_owned()),
                Just("true".to_owned()),
                any::<i64>().prop_map(|n| n.to_string()),
                "\\PC{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap()),
                Just(r#""\u003Cid\u003E""#.to_owned()),
            ]
        }

        fn value() -> impl Strategy<Value = String> {
            scalar().prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4)
                        .prop_map(|items| format!("[{}]", items.join(","))),
                    prop::collection::vec(("[a-c]{1,2}", inner), 0..4).prop_map(|members| {
                        let members: Vec<String> = members
                            .into_iter()
                            .map(|(k, v)| format!("{k:?} : {v}"))
                            .collect();
                        format!("{{ {} }}", members.join(" ,"))
                    }),
                ]
            })
        }

        fn body() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                (" {0,2}", value(), " {0,2}")
                    .prop_map(|(a, v, b)| format!("{a}{v}{b}").into_bytes()),
                "[ {}\\[\\]\":,a-c0-9\\\\]{0,24}".prop_map(String::into_bytes),
                prop::collection::vec(any::<u8>(), 0..16),
                value().prop_map(|v| {
                    let mut bytes = format!("{{\"a\":{v}}}").into_bytes();
                    bytes.insert(bytes.len() / 2, 0xff);
                    bytes
                }),
            ]
        }

        proptest! {
            #[test]
            fn reads_what_two_passes_read(body in body()) {
                let pairs = |m: &Members<&RawValue>| -> Vec<(String, String)> {
                    m.0.iter().map(|(k, v)| (k.to_string(), v.get().to_owned())).collect()
                };
                if let Ok(one) = serde_json::from_slice::<Members<&RawValue>>(&body) {
                    let two = top_level_members(&body).expect("two passes accept it too");
                    prop_assert_eq!(pairs(&one), pairs(&two));
                }
            }
        }
    }
}
