//! The inbound subject template (`inbound.subject`, default `cmc.inbound.{filter}`).
//!
//! Pure. Same rules as the event template of [`crate::subject`] (no empty tokens, no
//! wildcards or whitespace, known placeholders only), with the inbound placeholders
//! `{filter}` and `{server_composition}`; every substituted value is escaped with
//! [`crate::subject::escape_token`], so a filter such as `info@smtps.jp` can never add a token
//! or a wildcard.

use thiserror::Error;

use crate::subject::{escape_token, filter_contains};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    Filter,
    ServerComposition,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Value(Placeholder),
}

/// A validated inbound subject template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundSubject {
    source: String,
    tokens: Vec<Vec<Segment>>,
}

/// Why an inbound template was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InboundSubjectError {
    #[error("the subject template is empty")]
    Empty,
    #[error("token {0} of the subject template is empty")]
    EmptyToken(usize),
    #[error("unknown placeholder `{{{0}}}` (known: {{filter}}, {{server_composition}})")]
    UnknownPlaceholder(String),
    #[error("unbalanced `{{` or `}}` in the subject template")]
    Unbalanced,
    #[error("the subject template may not contain wildcards (`*`, `>`) or whitespace: {0:?}")]
    BadCharacter(String),
}

impl InboundSubject {
    pub fn parse(source: &str) -> Result<Self, InboundSubjectError> {
        if source.is_empty() {
            return Err(InboundSubjectError::Empty);
        }
        let mut tokens = Vec::new();
        for (i, token) in source.split('.').enumerate() {
            if token.is_empty() {
                return Err(InboundSubjectError::EmptyToken(i + 1));
            }
            tokens.push(parse_token(token)?);
        }
        Ok(InboundSubject {
            source: source.to_owned(),
            tokens,
        })
    }

    /// The subject of one mail.
    pub fn render(&self, filter: &str, server_composition: &str) -> String {
        let mut out = String::with_capacity(self.source.len() + filter.len() * 3);
        for (i, token) in self.tokens.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            for segment in token {
                match segment {
                    Segment::Literal(text) => out.push_str(text),
                    Segment::Value(Placeholder::Filter) => out.push_str(&escape_token(filter)),
                    Segment::Value(Placeholder::ServerComposition) => {
                        out.push_str(&escape_token(server_composition))
                    }
                }
            }
        }
        out
    }

    /// Every subject the template can produce, as a NATS filter (`*` for placeholder tokens).
    pub fn as_filter(&self) -> String {
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

    /// Whether every subject the template can produce matches one of `filters`.
    pub fn is_covered_by<S: AsRef<str>>(&self, filters: &[S]) -> bool {
        let produced = self.as_filter();
        filters
            .iter()
            .any(|f| filter_contains(f.as_ref(), &produced))
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

fn parse_token(token: &str) -> Result<Vec<Segment>, InboundSubjectError> {
    let mut segments = Vec::new();
    let mut rest = token;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('{') {
            let end = after.find('}').ok_or(InboundSubjectError::Unbalanced)?;
            let p = match &after[..end] {
                "filter" => Placeholder::Filter,
                "server_composition" => Placeholder::ServerComposition,
                other => return Err(InboundSubjectError::UnknownPlaceholder(other.to_owned())),
            };
            segments.push(Segment::Value(p));
            rest = &after[end + 1..];
        } else {
            let end = rest.find('{').unwrap_or(rest.len());
            let literal = &rest[..end];
            if literal.contains('}') {
                return Err(InboundSubjectError::Unbalanced);
            }
            if literal
                .chars()
                .any(|c| c == '*' || c == '>' || c.is_whitespace() || c.is_control())
            {
                return Err(InboundSubjectError::BadCharacter(token.to_owned()));
            }
            segments.push(Segment::Literal(literal.to_owned()));
            rest = &rest[end..];
        }
    }
    Ok(segments)
}

/// Whether two NATS subject filters can match a common subject (`*` and `>` wildcards on
/// either side): used to keep the events stream off the object store's `$O.<bucket>.>`.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (a.split('.'), b.split('.'));
    loop {
        match (a.next(), b.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == "*" || y == "*" || x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_template_escapes_the_filter_into_one_token() {
        let t = InboundSubject::parse("cmc.inbound.{filter}").unwrap();
        assert_eq!(
            t.render("info@smtps.jp", "sandbox"),
            "cmc.inbound.info%40smtps%2Ejp"
        );
        assert_eq!(t.render("a.b.>", "x"), "cmc.inbound.a%2Eb%2E%3E");
        assert_eq!(t.as_filter(), "cmc.inbound.*");
        assert!(t.is_covered_by(&["cmc.>"]));
        assert!(!t.is_covered_by(&["cmc.deliveries.>"]));
    }

    #[test]
    fn both_placeholders_render_and_bad_templates_are_refused() {
        let t = InboundSubject::parse("mail.{server_composition}.in-{filter}").unwrap();
        assert_eq!(t.render("f", "本番"), "mail.%E6%9C%AC%E7%95%AA.in-f");
        assert_eq!(t.as_filter(), "mail.*.*");
        for (bad, err) in [
            ("", InboundSubjectError::Empty),
            ("cmc..x", InboundSubjectError::EmptyToken(2)),
            (
                "cmc.{status}",
                InboundSubjectError::UnknownPlaceholder("status".into()),
            ),
            ("cmc.{filter", InboundSubjectError::Unbalanced),
            ("cmc.>", InboundSubjectError::BadCharacter(">".into())),
        ] {
            assert_eq!(InboundSubject::parse(bad).unwrap_err(), err, "{bad}");
        }
    }

    #[test]
    fn overlap_of_filters() {
        assert!(filters_overlap(">", "$O.CMC_INBOUND.>"));
        assert!(filters_overlap("$O.*.C.x", "$O.CMC_INBOUND.>"));
        assert!(!filters_overlap("cmc.>", "$O.CMC_INBOUND.>"));
        assert!(!filters_overlap("$O.OTHER.>", "$O.CMC_INBOUND.>"));
        assert!(filters_overlap("a.b", "a.*"));
        assert!(!filters_overlap("a.b", "a.b.c"));
    }
}
