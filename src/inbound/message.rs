//! From a validated [`Mail`] to what goes out (SPEC §7): the objects to store and the one
//! message, with its subject, body, headers and `Nats-Msg-Id`.
//!
//! Pure. [`plan`] decides which `text`/`html` bodies become objects: one larger than
//! [`INLINE_LIMIT`] always does (multipart spills such bodies to disk while reading, so they
//! are never held in memory), and a smaller one does when keeping it inline would push the
//! message past the server's `max_payload`, largest first. The body and the id are written
//! with the event webhook's JSON writers, so the id follows the same canonical form.

use std::borrow::Cow;

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::mail::{Body, Mail};
use crate::subject::header_value;
use crate::subject::InboundSubject;
use crate::webhook::json::{write_canonical, write_compact, Json, Members};

/// Bodies larger than this are always stored as objects (NATS's default `max_payload`).
pub const INLINE_LIMIT: u64 = 1024 * 1024;

/// Where an object's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source<'a> {
    /// A file of the mail's directory.
    File(&'a str),
    /// An inline body, stored from memory.
    Memory(&'a [u8]),
}

/// One object to store before the message goes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectToStore<'a> {
    /// Lowercase hex SHA-256 of the content: the object's name.
    pub name: String,
    pub size: u64,
    pub source: Source<'a>,
    /// Metadata: the field it came from, its decoded filename and content type.
    pub field: String,
    pub filename: String,
    pub content_type: String,
}

/// The mail's message, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMail {
    pub subject: String,
    pub payload: Vec<u8>,
    pub msg_id: String,
    pub headers: Vec<(&'static str, String)>,
}

impl OutgoingMail {
    /// Bytes the server counts against `max_payload`: body plus the header block.
    pub fn wire_size(&self) -> usize {
        crate::wire::wire_size(
            self.headers.iter().map(|(n, v)| (n.len(), v.len())),
            self.payload.len(),
        )
    }
}

/// Everything that goes out for one mail, in order: the objects, then the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned<'a> {
    pub objects: Vec<ObjectToStore<'a>>,
    pub message: OutgoingMail,
}

/// The message cannot fit `max_payload` even with both bodies stored as objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("the mail's message is {size} bytes even with its bodies stored as objects, over the NATS max_payload of {max} bytes")]
pub struct TooLarge {
    pub size: usize,
    pub max: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Text,
    Html,
}

/// Plans the objects and the message of `mail`.
pub fn plan<'a>(
    mail: &'a Mail,
    template: &InboundSubject,
    bucket: &str,
    batch_id: &str,
    max_payload: usize,
) -> Result<Planned<'a>, TooLarge> {
    let body = |w: Which| match w {
        Which::Text => mail.text.as_ref(),
        Which::Html => mail.html.as_ref(),
    };
    let mut stored: Vec<Which> = [Which::Text, Which::Html]
        .into_iter()
        .filter(|w| match body(*w) {
            Some(Body::File(_)) => true,
            Some(b @ Body::Inline(_)) => b.len() > INLINE_LIMIT,
            None => false,
        })
        .collect();
    let refs = BodyRefs::new(mail);
    loop {
        let message = render(mail, template, bucket, batch_id, &stored, &refs);
        if message.wire_size() <= max_payload {
            let mut objects = Vec::new();
            for w in [Which::Text, Which::Html] {
                if stored.contains(&w) {
                    objects.push(refs.object(mail, w));
                }
            }
            objects.extend(mail.attachments.iter().map(|a| ObjectToStore {
                name: a.data.sha256.clone(),
                size: a.data.size,
                source: Source::File(&a.data.file),
                field: a.field.clone(),
                filename: a.filename.clone(),
                content_type: a.content_type.clone(),
            }));
            return Ok(Planned { objects, message });
        }
        // Store the largest body still inline, and try again.
        let next = [Which::Text, Which::Html]
            .into_iter()
            .filter(|w| !stored.contains(w) && body(*w).is_some_and(|b| !b.is_empty()))
            .max_by_key(|w| body(*w).map_or(0, Body::len));
        match next {
            Some(w) => stored.push(w),
            None => {
                return Err(TooLarge {
                    size: message.wire_size(),
                    max: max_payload,
                })
            }
        }
    }
}

/// Digest and size of each body, computed once (an inline body is hashed only here).
struct BodyRefs {
    text: Option<(String, u64)>,
    html: Option<(String, u64)>,
}

impl BodyRefs {
    fn new(mail: &Mail) -> Self {
        let of = |b: &Option<Body>| {
            b.as_ref().map(|b| match b {
                Body::Inline(s) => (hex::encode(Sha256::digest(s.as_bytes())), s.len() as u64),
                Body::File(f) => (f.sha256.clone(), f.size),
            })
        };
        BodyRefs {
            text: of(&mail.text),
            html: of(&mail.html),
        }
    }

    fn get(&self, w: Which) -> Option<&(String, u64)> {
        match w {
            Which::Text => self.text.as_ref(),
            Which::Html => self.html.as_ref(),
        }
    }

    fn object<'a>(&self, mail: &'a Mail, w: Which) -> ObjectToStore<'a> {
        let (body, field, filename, content_type) = match w {
            Which::Text => (&mail.text, "text", "text.txt", "text/plain; charset=utf-8"),
            Which::Html => (&mail.html, "html", "html.html", "text/html; charset=utf-8"),
        };
        let (sha, size) = self.get(w).cloned().unwrap_or_default();
        let source = match body {
            Some(Body::File(f)) => Source::File(&f.file),
            Some(Body::Inline(s)) => Source::Memory(s.as_bytes()),
            None => Source::Memory(&[]),
        };
        ObjectToStore {
            name: sha,
            size,
            source,
            field: field.into(),
            filename: filename.into(),
            content_type: content_type.into(),
        }
    }
}

fn s(text: &str) -> Json<'_> {
    Json::String(Cow::Borrowed(text))
}

fn object<'a>(members: Vec<(&'static str, Json<'a>)>) -> Json<'a> {
    Json::Object(Members(
        members
            .into_iter()
            .map(|(k, v)| (Cow::Borrowed(k), v))
            .collect(),
    ))
}

fn render(
    mail: &Mail,
    template: &InboundSubject,
    bucket: &str,
    batch_id: &str,
    stored: &[Which],
    refs: &BodyRefs,
) -> OutgoingMail {
    // Numbers are borrowed text in the JSON tree; their text lives here.
    let sizes: Vec<String> = mail
        .attachments
        .iter()
        .map(|a| a.data.size.to_string())
        .collect();
    let body_sizes: Vec<String> = [Which::Text, Which::Html]
        .iter()
        .map(|w| refs.get(*w).map_or(0, |r| r.1).to_string())
        .collect();
    let extras: Vec<(&str, Json)> = mail
        .extra
        .iter()
        .filter(|(name, _)| name != "event_type")
        .map(|(name, raw)| {
            let value = serde_json::from_str::<Json>(raw).unwrap_or_else(|_| s(raw));
            (name.as_str(), value)
        })
        .collect();

    let mut members: Vec<(Cow<str>, Json)> = vec![
        ("event_type".into(), s("inbound")),
        ("server_composition".into(), s(&mail.server_composition)),
        ("filter".into(), s(&mail.filter)),
        ("subject".into(), s(&mail.subject)),
        ("envelope-from".into(), s(&mail.envelope_from)),
        ("envelope-to".into(), s(&mail.envelope_to)),
        (
            "headers".into(),
            Json::Array(
                mail.headers
                    .iter()
                    .map(|h| object(vec![("name", s(&h.name)), ("value", s(&h.value))]))
                    .collect(),
            ),
        ),
    ];
    for (i, (w, name, body)) in [
        (Which::Text, "text", &mail.text),
        (Which::Html, "html", &mail.html),
    ]
    .into_iter()
    .enumerate()
    {
        let Some(body) = body else { continue };
        let value = if stored.contains(&w) {
            let sha = refs.get(w).map_or("", |r| r.0.as_str());
            object(vec![
                ("object", s(sha)),
                ("size", Json::Number(&body_sizes[i])),
                ("sha256", s(sha)),
                ("bucket", s(bucket)),
            ])
        } else {
            match body {
                Body::Inline(text) => s(text),
                // Never reached: file bodies are always stored.
                Body::File(_) => Json::Null,
            }
        };
        members.push((name.into(), value));
    }
    members.extend(extras.into_iter().map(|(k, v)| (Cow::Borrowed(k), v)));
    members.push((
        "attachments".into(),
        Json::Array(
            mail.attachments
                .iter()
                .zip(&sizes)
                .map(|(a, size)| {
                    object(vec![
                        ("field", s(&a.field)),
                        ("filename", s(&a.filename)),
                        ("content_type", s(&a.content_type)),
                        ("size", Json::Number(size)),
                        ("sha256", s(&a.data.sha256)),
                        ("bucket", s(bucket)),
                        ("object", s(&a.data.sha256)),
                    ])
                })
                .collect(),
        ),
    ));
    let tree = Json::Object(Members(members));
    let mut payload = Vec::new();
    write_compact(&mut payload, &tree);
    let mut canonical = Vec::new();
    write_canonical(&mut canonical, &tree);
    let mut id = Sha256::new();
    id.update(mail.server_composition.as_bytes());
    id.update(b"\0inbound\0");
    id.update(&canonical);
    let msg_id = hex::encode(id.finalize());
    let headers = vec![
        ("Nats-Msg-Id", msg_id.clone()),
        ("Content-Type", "application/json".to_owned()),
        ("Cmc-Event-Type", "inbound".to_owned()),
        (
            "Cmc-Server-Composition",
            header_value(&mail.server_composition),
        ),
        ("Cmc-Filter", header_value(&mail.filter)),
        ("Cmc-Attachments", mail.attachments.len().to_string()),
        ("Cmc-Batch-Id", batch_id.to_owned()),
    ];
    OutgoingMail {
        subject: template.render(&mail.filter, &mail.server_composition),
        payload,
        msg_id,
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::mail::{parse_json, Attachment, StoredFile};

    const JSON: &str = include_str!("../../fixtures/inbound/json.json");

    fn template() -> InboundSubject {
        InboundSubject::parse("cmc.inbound.{filter}").unwrap()
    }

    fn fixture() -> Mail {
        parse_json(JSON.as_bytes()).unwrap().validate().unwrap()
    }

    #[test]
    fn the_json_fixture_renders_the_spec_body_in_order() {
        let mail = fixture();
        let planned = plan(&mail, &template(), "CMC_INBOUND", "b-1", 1 << 20).unwrap();
        assert!(planned.objects.is_empty());
        let m = &planned.message;
        assert_eq!(m.subject, "cmc.inbound.info%40smtps%2Ejp");
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(body["event_type"], "inbound");
        assert_eq!(body["server_composition"], "sandbox");
        assert_eq!(body["headers"][0]["value"], "<admin@smtps.jp>");
        assert_eq!(
            body["html"].as_str().unwrap().len(),
            mail.html.as_ref().unwrap().len() as usize
        );
        assert_eq!(body["attachments"], serde_json::json!([]));
        let text = String::from_utf8(m.payload.clone()).unwrap();
        let order: Vec<usize> = [
            "\"event_type\"",
            "\"server_composition\"",
            "\"filter\"",
            "\"subject\"",
            "\"envelope-from\"",
            "\"envelope-to\"",
            "\"headers\"",
            "\"text\"",
            "\"html\"",
            "\"attachments\"",
        ]
        .iter()
        .map(|k| text.find(k).unwrap_or_else(|| panic!("{k} missing")))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
        let header = |n: &str| m.headers.iter().find(|(k, _)| *k == n).unwrap().1.clone();
        assert_eq!(header("Cmc-Filter"), "info@smtps.jp");
        assert_eq!(header("Cmc-Attachments"), "0");
        assert_eq!(header("Nats-Msg-Id"), m.msg_id);
    }

    #[test]
    fn the_id_is_the_same_for_either_headers_form_and_any_batch() {
        let a = fixture();
        let mut v: serde_json::Value = serde_json::from_str(JSON).unwrap();
        v["headers"] = serde_json::Value::String(v["headers"].to_string());
        let b = parse_json(v.to_string().as_bytes())
            .unwrap()
            .validate()
            .unwrap();
        let pa = plan(&a, &template(), "B", "1", 1 << 20).unwrap();
        let pb = plan(&b, &template(), "B", "2", 1 << 20).unwrap();
        assert_eq!(pa.message.msg_id, pb.message.msg_id);
        let mut c = fixture();
        c.subject.push('!');
        assert_ne!(
            plan(&c, &template(), "B", "1", 1 << 20)
                .unwrap()
                .message
                .msg_id,
            pa.message.msg_id
        );
        // SHA-256 of server_composition NUL inbound NUL canonical body.
        let body: serde_json::Value = serde_json::from_slice(&pa.message.payload).unwrap();
        let mut canonical = Vec::new();
        let text = body.to_string();
        let tree: Json = serde_json::from_str(&text).unwrap();
        write_canonical(&mut canonical, &tree);
        let expected = hex::encode(Sha256::digest(
            [b"sandbox\0inbound\0".as_slice(), &canonical].concat(),
        ));
        assert_eq!(pa.message.msg_id, expected);
    }

    #[test]
    fn a_body_that_does_not_fit_max_payload_becomes_an_object() {
        let mut mail = fixture();
        let html = "<p>".repeat(700_000);
        mail.html = Some(Body::Inline(html.clone()));
        // 2.1 MB html: over INLINE_LIMIT, stored whatever max_payload says.
        let planned = plan(&mail, &template(), "CMC_INBOUND", "b", 8 << 20).unwrap();
        assert_eq!(planned.objects.len(), 1);
        let o = &planned.objects[0];
        assert_eq!(o.name, hex::encode(Sha256::digest(html.as_bytes())));
        assert_eq!(o.source, Source::Memory(html.as_bytes()));
        let body: serde_json::Value = serde_json::from_slice(&planned.message.payload).unwrap();
        assert_eq!(body["html"]["object"], o.name.as_str());
        assert_eq!(body["html"]["size"], html.len());
        assert_eq!(body["html"]["sha256"], o.name.as_str());
        assert!(body["text"].is_string());

        // Small bodies go out as objects only when the message would not fit, largest first.
        let mut mail = fixture();
        mail.text = Some(Body::Inline("t".repeat(3000)));
        mail.html = Some(Body::Inline("h".repeat(5000)));
        let planned = plan(&mail, &template(), "B", "b", 6000).unwrap();
        let fields: Vec<&str> = planned.objects.iter().map(|o| o.field.as_str()).collect();
        assert_eq!(fields, ["html"]);
        assert!(planned.message.wire_size() <= 6000);
        let planned = plan(&mail, &template(), "B", "b", 2500).unwrap();
        assert_eq!(planned.objects.len(), 2);
        assert_eq!(
            plan(&mail, &template(), "B", "b", 200).unwrap_err().max,
            200
        );
    }

    #[test]
    fn attachments_are_listed_and_planned_after_the_bodies() {
        let mut mail = fixture();
        mail.attachments = vec![Attachment {
            field: "attachment1".into(),
            filename: "画像1.jpg".into(),
            content_type: "image/jpeg".into(),
            data: StoredFile {
                file: "part-1".into(),
                size: 1234,
                sha256: "ab".repeat(32),
            },
        }];
        mail.extra = vec![
            ("x-spam".into(), "\"yes\"".into()),
            ("event_type".into(), "\"spoof\"".into()),
        ];
        let planned = plan(&mail, &template(), "CMC_INBOUND", "b", 1 << 20).unwrap();
        assert_eq!(planned.objects.len(), 1);
        assert_eq!(planned.objects[0].source, Source::File("part-1"));
        let body: serde_json::Value = serde_json::from_slice(&planned.message.payload).unwrap();
        assert_eq!(body["event_type"], "inbound");
        assert_eq!(body["x-spam"], "yes");
        assert_eq!(
            body["attachments"][0],
            serde_json::json!({"field":"attachment1","filename":"画像1.jpg","content_type":"image/jpeg",
                "size":1234,"sha256":"ab".repeat(32),"bucket":"CMC_INBOUND","object":"ab".repeat(32)})
        );
        let header = |n: &str| {
            planned
                .message
                .headers
                .iter()
                .find(|(k, _)| *k == n)
                .unwrap()
                .1
                .clone()
        };
        assert_eq!(header("Cmc-Attachments"), "1");
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::inbound::mail::{parse_form, parse_json};

    fn form_encode(s: &str) -> String {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    }

    proptest! {
        /// The same mail posted as JSON (headers as an array) or as a form (headers as a
        /// string) goes out as the same message with the same `Nats-Msg-Id`.
        #[test]
        fn json_and_form_encodings_of_one_mail_give_one_message(
            composition in "\\PC{1,12}",
            filter in "\\PC{1,20}",
            subject in "\\PC{0,20}",
            text in proptest::option::of("\\PC{0,40}"),
            headers in proptest::collection::vec(("[A-Za-z-]{1,12}", "\\PC{0,30}"), 0..5),
        ) {
            let header_json = serde_json::Value::Array(
                headers
                    .iter()
                    .map(|(n, v)| serde_json::json!({"name": n, "value": v}))
                    .collect(),
            );
            let mut json = serde_json::json!({
                "server_composition": composition,
                "filter": filter,
                "subject": subject,
                "headers": header_json,
            });
            let mut form = format!(
                "server_composition={}&filter={}&subject={}&headers={}",
                form_encode(&composition),
                form_encode(&filter),
                form_encode(&subject),
                form_encode(&header_json.to_string()),
            );
            if let Some(text) = &text {
                json["text"] = text.clone().into();
                form.push_str(&format!("&text={}", form_encode(text)));
            }
            let template = InboundSubject::parse("cmc.inbound.{server_composition}.{filter}").unwrap();
            let a = parse_json(json.to_string().as_bytes()).unwrap().validate().unwrap();
            let b = parse_form(form.as_bytes()).unwrap().validate().unwrap();
            let pa = plan(&a, &template, "B", "x", 1 << 20).unwrap();
            let pb = plan(&b, &template, "B", "y", 1 << 20).unwrap();
            prop_assert_eq!(&pa.message.msg_id, &pb.message.msg_id);
            prop_assert_eq!(&pa.message.payload, &pb.message.payload);
            prop_assert_eq!(&pa.message.subject, &pb.message.subject);
            // The subject is always three literal tokens plus two escaped ones.
            prop_assert_eq!(pa.message.subject.split('.').count(), 4);
            prop_assert!(!pa.message.subject.contains(['*', '>', ' ']));
        }
    }
}
