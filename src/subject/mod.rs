//! Subject templates (`nats.subject`) and the escaping that makes any value a safe, injective
//! NATS subject token.
//!
//! Pure: parsed once at start-up, rendered once per outgoing message. Owns the template
//! grammar and its one error type, shared by every subject template (the inbound one is in
//! [`inbound`]), the event placeholder
//! names, the token escaping (also used for `Cmc-*` header values) and the readable names of
//! CMC's bounce codes. Knows nothing of HTTP or NATS connections.

use std::fmt;

use thiserror::Error;

mod inbound;
pub use inbound::{filters_overlap, InboundSubject};

/// The longest `status` accepted, in bytes (SPEC §1). Escaped, one byte can take three, so a
/// status alone stays far below what one NATS protocol line may hold.
pub const MAX_STATUS_BYTES: usize = 128;

/// The longest rendered subject accepted, in bytes (SPEC §1): an entry whose subject would be
/// longer is invalid, so no entry can make the `PUB` line of its message one NATS refuses.
pub const MAX_SUBJECT_BYTES: usize = 512;

/// A value that can be substituted into a subject template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    EventType,
    Status,
    StatusName,
    ServerComposition,
}

impl Placeholder {
    const ALL: [(&'static str, Placeholder); 4] = [
        ("event_type", Placeholder::EventType),
        ("status", Placeholder::Status),
        ("status_name", Placeholder::StatusName),
        ("server_composition", Placeholder::ServerComposition),
    ];

    const KNOWN: &'static str = "{event_type}, {status}, {status_name}, {server_composition}";

    fn parse(name: &str) -> Option<Placeholder> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
    }
}

/// The values of one event, as they fill a template.
#[derive(Debug, Clone, Copy)]
pub struct SubjectValues<'a> {
    pub event_type: &'a str,
    pub status: &'a str,
    pub status_name: &'a str,
    pub server_composition: &'a str,
}

impl SubjectValues<'_> {
    fn get(&self, p: Placeholder) -> &str {
        match p {
            Placeholder::EventType => self.event_type,
            Placeholder::Status => self.status,
            Placeholder::StatusName => self.status_name,
            Placeholder::ServerComposition => self.server_composition,
        }
    }
}

/// One run of a template token: literal text, or a placeholder of the set `P`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment<P> {
    Literal(String),
    Value(P),
}

/// The template grammar shared by every subject template of the service (`nats.subject`,
/// `inbound.subject`, ...): dot-separated non-empty tokens, each a run of literals and
/// `{placeholder}`s from the set `P`, no wildcards, whitespace or control characters.
/// Substituted values are always escaped with [`escape_token`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template<P> {
    source: String,
    /// One entry per dot-separated token; each token is a run of segments.
    tokens: Vec<Vec<Segment<P>>>,
}

impl<P: Copy + PartialEq> Template<P> {
    /// Parses `source`, naming placeholders with `lookup` (`None`: unknown placeholder);
    /// `known` lists the placeholders for the error message.
    pub(crate) fn parse(
        source: &str,
        lookup: impl Fn(&str) -> Option<P>,
        known: &'static str,
    ) -> Result<Self, TemplateError> {
        if source.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut tokens = Vec::new();
        for (i, token) in source.split('.').enumerate() {
            if token.is_empty() {
                return Err(TemplateError::EmptyToken(i + 1));
            }
            tokens.push(parse_token(token, &lookup, known)?);
        }
        Ok(Template {
            source: source.to_owned(),
            tokens,
        })
    }

    /// Renders the template, each placeholder replaced by the escaped `value` of it; `extra`
    /// is a capacity hint for the substituted bytes.
    pub(crate) fn render<'v>(&self, extra: usize, value: impl Fn(P) -> &'v str) -> String {
        let mut out = String::with_capacity(self.source.len() + extra);
        for (i, token) in self.tokens.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            for segment in token {
                match segment {
                    Segment::Literal(text) => out.push_str(text),
                    Segment::Value(p) => escape_token_into(value(*p), &mut out),
                }
            }
        }
        out
    }

    /// The template with every token that holds a placeholder replaced by `*`: the set of
    /// subjects the template can produce, as a NATS subject filter.
    pub(crate) fn as_filter(&self) -> String {
        self.tokens
            .iter()
            .map(|token| {
                let mut literal = String::new();
                for segment in token {
                    match segment {
                        Segment::Literal(t) => literal.push_str(t),
                        Segment::Value(_) => return "*".to_owned(),
                    }
                }
                literal
            })
            .collect::<Vec<_>>()
            .join(".")
    }

    /// Whether every subject this template can produce matches at least one of `filters`.
    pub(crate) fn is_covered_by<S: AsRef<str>>(&self, filters: &[S]) -> bool {
        let produced = self.as_filter();
        filters
            .iter()
            .any(|f| filter_contains(f.as_ref(), &produced))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.source
    }

    pub(crate) fn into_source(self) -> String {
        self.source
    }

    /// Whether the template substitutes `placeholder` anywhere.
    pub(crate) fn uses(&self, placeholder: P) -> bool {
        self.tokens
            .iter()
            .flatten()
            .any(|s| matches!(s, Segment::Value(p) if *p == placeholder))
    }
}

/// A validated subject template such as `cmc.{event_type}.{status}`. Deserialised from its
/// text (compiled, or refused with the reason) and serialised back to it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct SubjectTemplate(Template<Placeholder>);

/// Why a subject template (`nats.subject`, `inbound.subject`, ...) was refused at start-up.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("the subject template is empty")]
    Empty,
    #[error("token {0} of the subject template is empty (two dots in a row, or a leading or trailing dot)")]
    EmptyToken(usize),
    /// The placeholder's name, and the ones the template knows.
    #[error("unknown placeholder `{{{name}}}` (known: {known})")]
    UnknownPlaceholder { name: String, known: &'static str },
    #[error("unbalanced `{{` or `}}` in the subject template")]
    Unbalanced,
    #[error("the subject template may not contain wildcards (`*`, `>`) or whitespace: {0:?}")]
    BadCharacter(String),
}

impl SubjectTemplate {
    /// Parses and validates a template.
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        Ok(SubjectTemplate(Template::parse(
            source,
            Placeholder::parse,
            Placeholder::KNOWN,
        )?))
    }

    /// Renders the subject of one event; every substituted value is escaped with
    /// [`escape_token`], so the result is always a valid subject without wildcards.
    pub fn render(&self, values: &SubjectValues<'_>) -> String {
        self.0.render(32, |p| values.get(p))
    }

    /// The template with every token that holds a placeholder replaced by `*`: the set of
    /// subjects the template can produce, as a NATS subject filter.
    pub fn as_filter(&self) -> String {
        self.0.as_filter()
    }

    /// Whether every subject this template can produce matches at least one of `filters`.
    pub fn is_covered_by<S: AsRef<str>>(&self, filters: &[S]) -> bool {
        self.0.is_covered_by(filters)
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// Whether the template substitutes `placeholder` anywhere.
    pub fn uses(&self, placeholder: Placeholder) -> bool {
        self.0.uses(placeholder)
    }
}

impl TryFrom<String> for SubjectTemplate {
    type Error = TemplateError;
    fn try_from(source: String) -> Result<Self, TemplateError> {
        SubjectTemplate::parse(&source)
    }
}

impl From<SubjectTemplate> for String {
    fn from(template: SubjectTemplate) -> String {
        template.0.into_source()
    }
}

impl std::str::FromStr for SubjectTemplate {
    type Err = TemplateError;
    fn from_str(source: &str) -> Result<Self, TemplateError> {
        SubjectTemplate::parse(source)
    }
}

impl fmt::Display for SubjectTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn parse_token<P>(
    token: &str,
    lookup: &impl Fn(&str) -> Option<P>,
    known: &'static str,
) -> Result<Vec<Segment<P>>, TemplateError> {
    let mut segments = Vec::new();
    let mut rest = token;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('{') {
            let end = after.find('}').ok_or(TemplateError::Unbalanced)?;
            let name = &after[..end];
            let p = lookup(name).ok_or_else(|| TemplateError::UnknownPlaceholder {
                name: name.to_owned(),
                known,
            })?;
            segments.push(Segment::Value(p));
            rest = &after[end + 1..];
        } else {
            let end = rest.find('{').unwrap_or(rest.len());
            let literal = &rest[..end];
            if literal.contains('}') {
                return Err(TemplateError::Unbalanced);
            }
            if literal
                .chars()
                .any(|c| c == '*' || c == '>' || c.is_whitespace() || c.is_control())
            {
                return Err(TemplateError::BadCharacter(token.to_owned()));
            }
            segments.push(Segment::Literal(literal.to_owned()));
            rest = &rest[end..];
        }
    }
    Ok(segments)
}

/// Whether the NATS subject filter `filter` matches every subject matched by `pattern`
/// (`pattern` may itself hold `*` tokens but no `>`).
pub fn filter_contains(filter: &str, pattern: &str) -> bool {
    let mut f = filter.split('.');
    let mut p = pattern.split('.');
    loop {
        match (f.next(), p.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(ft), Some(pt)) if ft == pt && pt != "*" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether a byte may stand unescaped in a subject token.
fn is_token_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Escapes a value into a subject token: bytes outside `[A-Za-z0-9_-]` become `%XX`
/// (uppercase hex of the UTF-8 byte). `%` itself is escaped, so the mapping is injective.
pub fn escape_token(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    escape_token_into(value, &mut out);
    out
}

fn escape_token_into(value: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if is_token_safe(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        }
    }
}

/// The value of a `Cmc-*` header: the raw value when it is printable ASCII without leading or
/// trailing space, else the whole value escaped like a subject token (so no CR, LF or NUL can
/// ever reach a header).
pub fn header_value(value: &str) -> String {
    let printable = value.bytes().all(|b| (0x20..=0x7e).contains(&b));
    if printable && !value.starts_with(' ') && !value.ends_with(' ') && !value.is_empty() {
        value.to_owned()
    } else {
        escape_token(value)
    }
}

/// The readable name of a CMC bounce code, as used by `{status_name}`.
pub fn bounce_status_name(code: &str) -> &'static str {
    match code {
        "1" => "host_unknown",
        "2" => "user_unknown",
        "3" => "retry_timeout",
        "4" => "rejected",
        "5" => "over_capacity",
        "6" => "forward_error",
        "7" => "receiver_error",
        "8" => "too_large",
        "9" => "invalid_address",
        "10" => "blocked",
        "11" => "unsubscribed",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn values<'a>(event_type: &'a str, status: &'a str, sc: &'a str) -> SubjectValues<'a> {
        SubjectValues {
            event_type,
            status,
            status_name: status,
            server_composition: sc,
        }
    }

    #[test]
    fn default_template_renders_spec_examples() {
        let t = SubjectTemplate::parse("cmc.{event_type}.{status}").unwrap();
        assert_eq!(
            t.render(&values("deliveries", "queued", "pro")),
            "cmc.deliveries.queued"
        );
        assert_eq!(t.render(&values("bounces", "2", "pro")), "cmc.bounces.2");
    }

    #[test]
    fn japanese_is_percent_escaped() {
        assert_eq!(escape_token("本番"), "%E6%9C%AC%E7%95%AA");
        let t = SubjectTemplate::parse("cmc.{server_composition}.{event_type}").unwrap();
        assert_eq!(
            t.render(&values("deliveries", "queued", "本番")),
            "cmc.%E6%9C%AC%E7%95%AA.deliveries"
        );
    }

    #[test]
    fn wildcards_dots_and_percent_are_escaped() {
        assert_eq!(escape_token("a.b*c>d e%"), "a%2Eb%2Ac%3Ed%20e%25");
        assert_eq!(escape_token("A-z_09"), "A-z_09");
    }

    #[test]
    fn templates_are_validated() {
        use TemplateError::*;
        assert_eq!(SubjectTemplate::parse(""), Err(Empty));
        assert_eq!(SubjectTemplate::parse("cmc..x"), Err(EmptyToken(2)));
        assert_eq!(
            SubjectTemplate::parse("cmc.{x}"),
            Err(UnknownPlaceholder {
                name: "x".into(),
                known: Placeholder::KNOWN
            })
        );
        assert_eq!(SubjectTemplate::parse("cmc.{status"), Err(Unbalanced));
        assert_eq!(SubjectTemplate::parse("cmc.status}"), Err(Unbalanced));
        assert!(matches!(
            SubjectTemplate::parse("cmc.*"),
            Err(BadCharacter(_))
        ));
        assert!(matches!(
            SubjectTemplate::parse("cmc.>"),
            Err(BadCharacter(_))
        ));
        assert!(matches!(
            SubjectTemplate::parse("cmc.a b"),
            Err(BadCharacter(_))
        ));
        assert!(SubjectTemplate::parse("cmc.{event_type}-{status_name}.x").is_ok());
    }

    #[test]
    fn coverage_by_stream_subjects() {
        let t = SubjectTemplate::parse("cmc.{event_type}.{status}").unwrap();
        assert_eq!(t.as_filter(), "cmc.*.*");
        assert!(t.is_covered_by(&["cmc.>"]));
        assert!(t.is_covered_by(&["other.>", "cmc.*.*"]));
        assert!(!t.is_covered_by(&["cmc.*"]));
        assert!(!t.is_covered_by(&["cmc.deliveries.*"]));
        assert!(!t.is_covered_by(&["mail.>"]));
        let fixed = SubjectTemplate::parse("cmc.events").unwrap();
        assert!(fixed.is_covered_by(&["cmc.events"]));
        assert!(!fixed.is_covered_by(&["cmc.events.>"]));
    }

    #[test]
    fn header_values_are_raw_only_when_safe() {
        assert_eq!(header_value("pro"), "pro");
        assert_eq!(header_value("a b"), "a b");
        assert_eq!(header_value(" pro"), "%20pro");
        assert_eq!(header_value("本番"), "%E6%9C%AC%E7%95%AA");
        assert_eq!(header_value("a\r\nb"), "a%0D%0Ab");
    }

    #[test]
    fn hostile_statuses_are_escaped_in_subject_and_header() {
        let t = SubjectTemplate::parse("cmc.{event_type}.{status}").unwrap();
        let hostile = "a.b*> c\r\nX-Injected: 1\0";
        let subject = t.render(&values("deliveries", hostile, "pro"));
        assert_eq!(
            subject,
            "cmc.deliveries.a%2Eb%2A%3E%20c%0D%0AX-Injected%3A%201%00"
        );
        assert_eq!(subject.split('.').count(), 3);
        let header = header_value(hostile);
        assert_eq!(header, "a%2Eb%2A%3E%20c%0D%0AX-Injected%3A%201%00");
        assert!(!header.bytes().any(|b| b < 0x20 || b == 0x7f));
        // The longest status escapes to at most three bytes each: far below the subject cap.
        let longest = "\0".repeat(MAX_STATUS_BYTES);
        assert_eq!(escape_token(&longest).len(), 3 * MAX_STATUS_BYTES);
        const { assert!(3 * MAX_STATUS_BYTES < MAX_SUBJECT_BYTES) };
    }

    #[test]
    fn templates_tell_which_placeholders_they_use() {
        let t = SubjectTemplate::parse("cmc.invalid.{event_type}").unwrap();
        assert!(t.uses(Placeholder::EventType));
        assert!(!t.uses(Placeholder::Status));
        assert!(!t.uses(Placeholder::ServerComposition));
    }

    #[test]
    fn bounce_codes_have_names() {
        assert_eq!(bounce_status_name("1"), "host_unknown");
        assert_eq!(bounce_status_name("2"), "user_unknown");
        assert_eq!(bounce_status_name("11"), "unsubscribed");
        assert_eq!(bounce_status_name("99"), "other");
        assert_eq!(bounce_status_name("42"), "other");
    }

    fn unescape(token: &str) -> Vec<u8> {
        let b = token.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&token[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    proptest! {
        #[test]
        fn escaping_is_injective_and_reversible(a in ".*", b in ".*") {
            let (ea, eb) = (escape_token(&a), escape_token(&b));
            prop_assert_eq!(unescape(&ea), a.as_bytes().to_vec());
            if a != b {
                prop_assert_ne!(ea, eb);
            }
        }

        #[test]
        fn rendered_subjects_are_valid(et in "[a-z0-9_]{1,64}", st in "\\PC{1,20}", sc in ".{1,20}") {
            let t = SubjectTemplate::parse("cmc.{server_composition}.{event_type}.{status}").unwrap();
            let subject = t.render(&values(&et, &st, &sc));
            let tokens: Vec<&str> = subject.split('.').collect();
            prop_assert_eq!(tokens.len(), 4);
            for token in tokens {
                prop_assert!(!token.is_empty());
                prop_assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-%".contains(&b)));
            }
        }
    }
}
