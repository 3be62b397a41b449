//! The inbound subject template (`inbound.subject`, default `cmc.inbound.{filter}`).
//!
//! Pure. Parsed and rendered by the template grammar of the [parent module](super) (no empty tokens,
//! no wildcards or whitespace, known placeholders only), with the inbound placeholders
//! `{filter}` and `{server_composition}`; every substituted value is escaped with
//! [`super::escape_token`], so a filter such as `info@smtps.jp` can never add a token
//! or a wildcard.

use std::fmt;

use super::{Template, TemplateError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    Filter,
    ServerComposition,
}

impl Placeholder {
    const KNOWN: &'static str = "{filter}, {server_composition}";

    fn parse(name: &str) -> Option<Placeholder> {
        match name {
            "filter" => Some(Placeholder::Filter),
            "server_composition" => Some(Placeholder::ServerComposition),
            _ => None,
        }
    }
}

/// A validated inbound subject template, deserialised from its text (compiled, or refused with
/// the reason) and serialised back to it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct InboundSubject(Template<Placeholder>);

impl InboundSubject {
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        Ok(InboundSubject(Template::parse(
            source,
            Placeholder::parse,
            Placeholder::KNOWN,
        )?))
    }

    /// The subject of one mail.
    pub fn render(&self, filter: &str, server_composition: &str) -> String {
        self.0.render(filter.len() * 3, |p| match p {
            Placeholder::Filter => filter,
            Placeholder::ServerComposition => server_composition,
        })
    }

    /// Every subject the template can produce, as a NATS filter (`*` for placeholder tokens).
    pub fn as_filter(&self) -> String {
        self.0.as_filter()
    }

    /// Whether every subject the template can produce matches one of `filters`.
    pub fn is_covered_by<S: AsRef<str>>(&self, filters: &[S]) -> bool {
        self.0.is_covered_by(filters)
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl TryFrom<String> for InboundSubject {
    type Error = TemplateError;
    fn try_from(source: String) -> Result<Self, TemplateError> {
        InboundSubject::parse(&source)
    }
}

impl From<InboundSubject> for String {
    fn from(template: InboundSubject) -> String {
        template.0.into_source()
    }
}

impl fmt::Display for InboundSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
            ("", TemplateError::Empty),
            ("cmc..x", TemplateError::EmptyToken(2)),
            (
                "cmc.{status}",
                TemplateError::UnknownPlaceholder {
                    name: "status".into(),
                    known: Placeholder::KNOWN,
                },
            ),
            ("cmc.{filter", TemplateError::Unbalanced),
            ("cmc.>", TemplateError::BadCharacter(">".into())),
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
