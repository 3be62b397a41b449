//! The parameters of one inbound POST, whatever the encoding, and their validation into a
//! typed [`Mail`].
//!
//! Pure: the JSON and form-urlencoded bodies are parsed here from bytes; multipart parts are
//! collected by [`super::receive`] (which streams file parts to disk) into the same
//! [`FieldSet`]. [`FieldSet::validate`] then applies SPEC §7's rules all-or-nothing. Errors are
//! the event webhook's [`PayloadError`], so both endpoints answer with the same codes.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::webhook::json::{Json, Members};
use crate::webhook::{form_component, PayloadError};

/// A file already written to the mail's working directory, with its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// File name inside the mail's directory.
    pub file: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the content: also the object's name in the bucket.
    pub sha256: String,
}

/// A file part of a multipart body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePart {
    /// Decoded filename (RFC 2047 / RFC 2231), empty when the part had none.
    pub filename: String,
    pub content_type: String,
    pub data: StoredFile,
}

/// One parameter's value as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// A form or multipart text value.
    Text(String),
    /// A member of a JSON body: the value's JSON text, as received.
    Json(String),
    /// A multipart text value too large to keep in memory (`text`/`html`), spilled to disk.
    Spilled(StoredFile),
    /// A multipart file part.
    File(FilePart),
}

/// The parameters of one request, in their original order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSet {
    pub fields: Vec<(String, Field)>,
}

/// One mail header line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailHeader {
    pub name: String,
    pub value: String,
}

/// A `text` or `html` body: inline, or in a file of the mail's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    Inline(String),
    File(StoredFile),
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Inline(s) => s.len() as u64,
            Body::File(f) => f.size,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One attachment of a mail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The part's name, `attachment1` … `attachmentN`.
    pub field: String,
    pub filename: String,
    pub content_type: String,
    pub data: StoredFile,
}

/// A validated inbound mail: what the message is built from, and what the spool keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mail {
    pub server_composition: String,
    pub filter: String,
    pub subject: String,
    pub envelope_from: String,
    pub envelope_to: String,
    pub headers: Vec<MailHeader>,
    pub text: Option<Body>,
    pub html: Option<Body>,
    /// Unknown parameters, kept: name and the value's JSON text (a string for form fields).
    pub extra: Vec<(String, String)>,
    /// In `attachment1` … `attachmentN` order.
    pub attachments: Vec<Attachment>,
}

impl Mail {
    /// Bytes of attachments and spilled bodies on disk.
    pub fn file_bytes(&self) -> u64 {
        let bodies = [&self.text, &self.html]
            .into_iter()
            .flatten()
            .map(|b| match b {
                Body::File(f) => f.size,
                Body::Inline(_) => 0,
            });
        self.attachments
            .iter()
            .map(|a| a.data.size)
            .chain(bodies)
            .sum()
    }
}

/// Whether `name` is `attachmentN` with N ≥ 1 (no leading zero); returns N.
pub fn attachment_number(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("attachment")?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Parses an `application/json` body: one object, no duplicate key.
pub fn parse_json(body: &[u8]) -> Result<FieldSet, PayloadError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| PayloadError::MalformedJson("the body is not UTF-8".into()))?;
    let members: Members<'_, &RawValue> = serde_json::from_str(text).map_err(|e| {
        // Valid JSON that is not an object parses; it just is not a mail (as for events).
        match serde_json::from_str::<&RawValue>(text) {
            Ok(raw) => invalid(format!(
                "the body must be a JSON object, not {}",
                crate::webhook::json::raw_kind(raw)
            )),
            Err(_) => PayloadError::MalformedJson(format!("the body is not valid JSON: {e}")),
        }
    })?;
    if let Some(key) = members.first_duplicate() {
        return Err(PayloadError::MalformedJson(format!(
            "parameter {key:?} is given twice"
        )));
    }
    Ok(FieldSet {
        fields: members
            .0
            .into_iter()
            .map(|(k, v)| (k.into_owned(), Field::Json(v.get().to_owned())))
            .collect(),
    })
}

/// Parses an `application/x-www-form-urlencoded` body with the event webhook's strict decoder
/// (`+` is a space, `%XX` a byte, the result UTF-8; a broken escape is refused, never passed
/// on altered); a repeated field is refused.
pub fn parse_form(body: &[u8]) -> Result<FieldSet, PayloadError> {
    let mut set = FieldSet::default();
    for pair in body.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|b| *b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &b""[..]),
        };
        let name = form_component(name, None)?;
        let value = form_component(value, Some(&name))?;
        set.push(name, Field::Text(value))?;
    }
    Ok(set)
}

fn invalid(message: impl Into<String>) -> PayloadError {
    PayloadError::Invalid {
        message: message.into(),
        index: None,
    }
}

impl FieldSet {
    /// Adds a parameter; one that is already there is a malformed body (two parsers must
    /// never read one request differently).
    pub fn push(&mut self, name: String, field: Field) -> Result<(), PayloadError> {
        if self.fields.iter().any(|(n, _)| *n == name) {
            return Err(PayloadError::MalformedForm(format!(
                "field {name:?} is given twice"
            )));
        }
        self.fields.push((name, field));
        Ok(())
    }

    /// The `api_key` parameter, for the route's check (before anything else is looked at).
    pub fn api_key(&self) -> Option<String> {
        self.fields
            .iter()
            .find(|(n, _)| n == "api_key")
            .and_then(|(_, f)| string_value(f).ok())
    }

    /// Checks every rule of SPEC §7 and builds the mail. All-or-nothing.
    pub fn validate(self) -> Result<Mail, PayloadError> {
        let mut mail = Mail {
            server_composition: String::new(),
            filter: String::new(),
            subject: String::new(),
            envelope_from: String::new(),
            envelope_to: String::new(),
            headers: Vec::new(),
            text: None,
            html: None,
            extra: Vec::new(),
            attachments: Vec::new(),
        };
        let (mut composition, mut filter, mut headers, mut count) = (None, None, None, None);
        let mut files: Vec<(usize, Attachment)> = Vec::new();
        for (name, field) in self.fields {
            fn named(what: &str) -> impl Fn(String) -> PayloadError + '_ {
                move |e| invalid(format!("{what}: {e}"))
            }
            match name.as_str() {
                "api_key" => {}
                "server_composition" => {
                    composition = Some(string_value(&field).map_err(named("server_composition"))?)
                }
                "filter" => filter = Some(string_value(&field).map_err(named("filter"))?),
                "headers" => headers = Some(parse_headers(&field)?),
                "subject" => mail.subject = string_value(&field).map_err(named("subject"))?,
                "envelope-from" => {
                    mail.envelope_from = string_value(&field).map_err(named("envelope-from"))?
                }
                "envelope-to" => {
                    mail.envelope_to = string_value(&field).map_err(named("envelope-to"))?
                }
                "text" | "html" => {
                    let body = match field {
                        Field::Spilled(file) => Body::File(file),
                        other => Body::Inline(string_value(&other).map_err(named(&name))?),
                    };
                    if name == "text" {
                        mail.text = Some(body);
                    } else {
                        mail.html = Some(body);
                    }
                }
                "attachments" => count = Some(parse_count(&field)?),
                _ => match field {
                    Field::File(part) => {
                        let n = attachment_number(&name).ok_or_else(|| {
                            invalid(format!(
                                "file part {name:?} is not named attachment1 … attachmentN"
                            ))
                        })?;
                        files.push((
                            n,
                            Attachment {
                                field: name,
                                filename: part.filename,
                                content_type: part.content_type,
                                data: part.data,
                            },
                        ));
                    }
                    Field::Text(s) => {
                        let mut json = Vec::with_capacity(s.len() + 2);
                        crate::webhook::json::write_string(&mut json, &s);
                        mail.extra
                            .push((name, String::from_utf8(json).unwrap_or_default()));
                    }
                    Field::Json(raw) => mail.extra.push((name, raw)),
                    Field::Spilled(_) => {
                        return Err(invalid(format!("parameter {name:?} is too large")))
                    }
                },
            }
        }
        mail.server_composition = composition
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid("server_composition is required (a non-empty string)"))?;
        mail.filter = filter
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid("filter is required (a non-empty string)"))?;
        mail.headers = headers.ok_or_else(|| {
            invalid("headers is required (a JSON array of {\"name\",\"value\"} objects)")
        })?;
        let declared = count.unwrap_or(0);
        if declared != files.len() {
            return Err(invalid(format!(
                "attachments says {declared} but the body has {} file part(s)",
                files.len()
            )));
        }
        files.sort_by_key(|(n, _)| *n);
        if let Some((n, a)) = files
            .iter()
            .enumerate()
            .find(|(i, (n, _))| *n != i + 1)
            .map(|(_, f)| f)
        {
            return Err(invalid(format!(
                "file part {:?} (number {n}) does not fit attachment1 … attachment{declared}",
                a.field
            )));
        }
        mail.attachments = files.into_iter().map(|(_, a)| a).collect();
        Ok(mail)
    }
}

/// A parameter that must be a string: a form value, or a JSON string.
fn string_value(field: &Field) -> Result<String, String> {
    match field {
        Field::Text(s) => Ok(s.clone()),
        Field::Json(raw) => match serde_json::from_str::<Json>(raw) {
            Ok(Json::String(s)) => Ok(s.into_owned()),
            Ok(other) => Err(format!("must be a string, not {}", other.kind())),
            Err(e) => Err(e.to_string()),
        },
        Field::Spilled(_) => Err("is too large".into()),
        Field::File(_) => Err("must be a text field, not a file".into()),
    }
}

/// `attachments`: a non-negative integer, as a JSON number or a decimal string.
fn parse_count(field: &Field) -> Result<usize, PayloadError> {
    let text = match field {
        Field::Text(s) => s.trim().to_owned(),
        Field::Json(raw) => match serde_json::from_str::<Json>(raw) {
            Ok(Json::Number(n)) => n.to_owned(),
            Ok(Json::String(s)) => s.trim().to_owned(),
            _ => String::new(),
        },
        _ => String::new(),
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("attachments must be a non-negative integer"));
    }
    text.parse()
        .map_err(|_| invalid("attachments must be a non-negative integer"))
}

/// `headers`: a JSON array of `{"name": string, "value": string}`, given as an array (JSON
/// body) or as a JSON string holding one (every encoding).
fn parse_headers(field: &Field) -> Result<Vec<MailHeader>, PayloadError> {
    let bad = |why: String| {
        invalid(format!(
            "headers must be a JSON array of {{\"name\",\"value\"}} string pairs: {why}"
        ))
    };
    let text: String = match field {
        Field::Text(s) => s.clone(),
        Field::Json(raw) => match serde_json::from_str::<Json>(raw) {
            Ok(Json::String(s)) => s.into_owned(),
            Ok(Json::Array(_)) => raw.clone(),
            Ok(other) => return Err(bad(format!("got {}", other.kind()))),
            Err(e) => return Err(bad(e.to_string())),
        },
        _ => return Err(bad("got a file".into())),
    };
    let value: Json = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let Json::Array(items) = value else {
        return Err(bad(format!("got {}", value.kind())));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Json::Object(members) = item else {
                return Err(bad(format!("item {i} is {}", item.kind())));
            };
            let get = |key: &str| match members.get(key) {
                Some(Json::String(s)) => Ok(s.to_string()),
                Some(other) => Err(bad(format!("item {i}: {key} is {}", other.kind()))),
                None => Err(bad(format!("item {i} has no {key}"))),
            };
            Ok(MailHeader {
                name: get("name")?,
                value: get("value")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = include_str!("../../fixtures/inbound/json.json");

    fn file(n: usize) -> Field {
        Field::File(FilePart {
            filename: format!("f{n}.bin"),
            content_type: "application/octet-stream".into(),
            data: StoredFile {
                file: format!("part-{n}"),
                size: 3,
                sha256: "00".repeat(32),
            },
        })
    }

    fn base() -> FieldSet {
        let mut set = FieldSet::default();
        for (k, v) in [
            ("server_composition", "sandbox"),
            ("filter", "info@smtps.jp"),
            ("headers", r#"[{"name":"To","value":"info@smtps.jp"}]"#),
        ] {
            set.push(k.into(), Field::Text(v.into())).unwrap();
        }
        set
    }

    fn error_of(set: FieldSet) -> PayloadError {
        set.validate().unwrap_err()
    }

    #[test]
    fn the_json_fixture_validates_with_headers_and_bodies() {
        let mail = parse_json(JSON.as_bytes()).unwrap().validate().unwrap();
        assert_eq!(mail.server_composition, "sandbox");
        assert_eq!(mail.filter, "info@smtps.jp");
        assert_eq!(mail.subject, "テストメール");
        assert_eq!(mail.envelope_from, "admin@smtps.jp");
        assert_eq!(mail.headers.len(), 11);
        assert_eq!(mail.headers[0].name, "Return-Path");
        assert_eq!(mail.headers[0].value, "<admin@smtps.jp>");
        assert!(matches!(&mail.text, Some(Body::Inline(t)) if t.starts_with("これは")));
        assert!(mail.attachments.is_empty());
    }

    #[test]
    fn headers_may_arrive_as_a_string_in_json() {
        let mut v: serde_json::Value = serde_json::from_str(JSON).unwrap();
        let as_string = v["headers"].to_string();
        v["headers"] = serde_json::Value::String(as_string);
        let mail = parse_json(v.to_string().as_bytes())
            .unwrap()
            .validate()
            .unwrap();
        let again = parse_json(JSON.as_bytes()).unwrap().validate().unwrap();
        assert_eq!(mail.headers, again.headers);
    }

    #[test]
    fn missing_or_empty_required_parameters_are_invalid() {
        for drop in ["server_composition", "filter", "headers"] {
            let mut set = base();
            set.fields.retain(|(n, _)| n != drop);
            let err = error_of(set);
            assert!(
                matches!(err, PayloadError::Invalid { .. }),
                "{drop}: {err:?}"
            );
            assert!(err.to_string().contains(drop), "{err}");
        }
        let mut set = base();
        set.fields[1].1 = Field::Text(String::new());
        assert!(error_of(set).to_string().contains("filter"));
    }

    #[test]
    fn headers_that_are_not_name_value_pairs_are_invalid() {
        for bad in [
            "not json",
            r#"{"name":"a","value":"b"}"#,
            r#"["To: x"]"#,
            r#"[{"name":"To"}]"#,
            r#"[{"name":"To","value":1}]"#,
        ] {
            let mut set = base();
            set.fields[2].1 = Field::Text(bad.into());
            let err = error_of(set);
            assert!(
                matches!(err, PayloadError::Invalid { .. }),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().contains("headers"), "{err}");
        }
        let mut set = base();
        set.fields[2].1 = Field::Json("42".into());
        assert!(error_of(set).to_string().contains("headers"));
    }

    #[test]
    fn attachments_must_match_the_file_parts() {
        let mut set = base();
        set.push("attachments".into(), Field::Text("2".into()))
            .unwrap();
        set.push("attachment1".into(), file(1)).unwrap();
        assert!(error_of(set).to_string().contains("attachments says 2"));

        let mut set = base();
        set.push("attachment2".into(), file(2)).unwrap();
        set.push("attachments".into(), Field::Text("2".into()))
            .unwrap();
        set.push("attachment1".into(), file(1)).unwrap();
        let mail = set.validate().unwrap();
        let names: Vec<&str> = mail.attachments.iter().map(|a| a.field.as_str()).collect();
        assert_eq!(names, ["attachment1", "attachment2"]);

        let mut set = base();
        set.push("attachments".into(), Field::Text("1".into()))
            .unwrap();
        set.push("attachment2".into(), file(2)).unwrap();
        assert!(error_of(set).to_string().contains("attachment2"));

        let mut set = base();
        set.push("attachments".into(), Field::Text("1".into()))
            .unwrap();
        set.push("upload".into(), file(1)).unwrap();
        assert!(error_of(set).to_string().contains("upload"));

        // JSON: a count without file parts disagrees; 0 or absent is fine.
        let mut set = base();
        set.push("attachments".into(), Field::Json("1".into()))
            .unwrap();
        assert!(error_of(set).to_string().contains("attachments"));
        let mut set = base();
        set.push("attachments".into(), Field::Json("\"0\"".into()))
            .unwrap();
        assert!(set.validate().is_ok());
        let mut set = base();
        set.push("attachments".into(), Field::Text("two".into()))
            .unwrap();
        assert!(error_of(set).to_string().contains("integer"));
    }

    #[test]
    fn repeated_fields_are_malformed_in_every_encoding() {
        assert!(matches!(
            parse_form(b"filter=a&filter=b"),
            Err(PayloadError::MalformedForm(_))
        ));
        assert!(matches!(
            parse_json(br#"{"filter":"a","filter":"b"}"#),
            Err(PayloadError::MalformedJson(_))
        ));
        assert!(matches!(
            parse_json(b"[1]"),
            Err(PayloadError::Invalid { .. })
        ));
        assert!(matches!(
            parse_json(b"{"),
            Err(PayloadError::MalformedJson(_))
        ));
    }

    #[test]
    fn form_bodies_decode_and_unknown_parameters_are_kept() {
        let body = "server_composition=%E6%9C%AC%E7%95%AA&filter=a%40b.jp&headers=%5B%5D&x-extra=1+2&api_key=k";
        let set = parse_form(body.as_bytes()).unwrap();
        assert_eq!(set.api_key().as_deref(), Some("k"));
        let mail = set.validate().unwrap();
        assert_eq!(mail.server_composition, "本番");
        assert_eq!(mail.filter, "a@b.jp");
        assert_eq!(mail.extra, [("x-extra".to_owned(), "\"1 2\"".to_owned())]);
    }

    /// The event webhook's strict decoder: a broken escape or bytes that are not UTF-8 are a
    /// malformed body naming the field, never passed on altered.
    #[test]
    fn form_bodies_with_broken_escapes_or_bad_utf8_are_malformed() {
        for body in [
            &b"server_composition=sandbox&filter=%zz"[..],
            b"filter=a%4",
            b"filter=%+1",
            b"filter=%FF",
            b"fil%zzter=a",
        ] {
            match parse_form(body) {
                Err(PayloadError::MalformedForm(message)) => {
                    assert!(message.contains("form field"), "{message}")
                }
                other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
    }

    #[test]
    fn attachment_numbers() {
        assert_eq!(attachment_number("attachment1"), Some(1));
        assert_eq!(attachment_number("attachment12"), Some(12));
        for bad in [
            "attachment",
            "attachment0",
            "attachment01",
            "attachments",
            "x1",
        ] {
            assert_eq!(attachment_number(bad), None, "{bad}");
        }
    }
}
