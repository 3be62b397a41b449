//! W3C Trace Context (`traceparent`, <https://www.w3.org/TR/trace-context/>): parsing the
//! header a request brings, continuing it as a child span, or starting a new trace.
//!
//! Pure: the random ids a new span needs are passed in, so every rule is unit-tested here.
//! One value is built per request and carried by every message of its batch (SPEC §2).

use std::fmt;

/// One `traceparent` value: version `00`, trace id, parent (span) id and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

/// The `sampled` bit of the trace flags.
pub const SAMPLED: u8 = 0x01;

impl TraceParent {
    /// Parses a `traceparent` header value; `None` when it is not a valid one (the caller then
    /// starts a new trace, as the specification asks).
    ///
    /// Version `00` must be exactly 55 characters. A higher version is read by its first four
    /// fields, provided what follows them starts with `-` (forward compatibility, §3.2.4);
    /// version `ff`, upper-case hex and all-zero ids are invalid.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let value = value.trim_matches([' ', '\t']);
        let b = value.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex_byte(&b[0..2])?;
        if version == 0xff || (version == 0 && b.len() != 55) {
            return None;
        }
        if b.len() > 55 && b[55] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(&b[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, out) in span_id.iter_mut().enumerate() {
            *out = hex_byte(&b[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&b[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// This trace continued by a child span `span_id`: same trace id, flags kept.
    pub fn child(&self, span_id: [u8; 8]) -> TraceParent {
        TraceParent {
            trace_id: self.trace_id,
            span_id: nonzero_span(span_id),
            flags: self.flags,
        }
    }

    /// A new trace made of the random bytes `ids` (trace id, then span id), marked sampled
    /// only when `sampled` (SPEC §2: when the service exports spans; W3C lets a caller that
    /// records nothing say so, and a sampled mark makes consumers and nats-server do more).
    pub fn root(ids: [u8; 24], sampled: bool) -> TraceParent {
        let mut trace_id = [0u8; 16];
        trace_id.copy_from_slice(&ids[..16]);
        if trace_id == [0; 16] {
            trace_id[15] = 1;
        }
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&ids[16..]);
        TraceParent {
            trace_id,
            span_id: nonzero_span(span_id),
            flags: if sampled { SAMPLED } else { 0 },
        }
    }

    /// The parent a request names in its `traceparent` headers: the one valid header; `None`
    /// when there is none, several, or an invalid one.
    pub fn parent_of<'h>(headers: impl IntoIterator<Item = &'h [u8]>) -> Option<TraceParent> {
        let mut headers = headers.into_iter();
        match (headers.next(), headers.next()) {
            (Some(one), None) => std::str::from_utf8(one).ok().and_then(TraceParent::parse),
            _ => None,
        }
    }

    /// The span of a request whose `traceparent` headers are `headers`: a child of its parent
    /// (see [`TraceParent::parent_of`]; its flags kept), else the root of a new trace, sampled
    /// when `sampled`; `ids` are random bytes.
    pub fn for_request<'h>(
        headers: impl IntoIterator<Item = &'h [u8]>,
        ids: [u8; 24],
        sampled: bool,
    ) -> TraceParent {
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&ids[16..]);
        match TraceParent::parent_of(headers) {
            Some(parent) => parent.child(span_id),
            None => TraceParent::root(ids, sampled),
        }
    }

    /// The trace id as 32 lowercase hex digits (how logs and trace viewers show it).
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }
}

/// The header value: `00-<trace id>-<span id>-<flags>`, lowercase hex.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }
}

fn nonzero_span(mut span_id: [u8; 8]) -> [u8; 8] {
    if span_id == [0; 8] {
        span_id[7] = 1;
    }
    span_id
}

/// Two lowercase hex digits.
fn hex_byte(pair: &[u8]) -> Option<u8> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some(digit(pair[0])? << 4 | digit(pair[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_specification_example() {
        let t = TraceParent::parse(VALID).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(t.span_id), "00f067aa0ba902b7");
        assert_eq!(t.flags, 1);
        assert_eq!(t.to_string(), VALID);
    }

    #[test]
    fn refuses_what_the_specification_refuses() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version is read by its first four fields.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-says";
        assert_eq!(
            TraceParent::parse(later).unwrap().trace_id_hex(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn a_request_span_continues_a_valid_parent_and_starts_a_trace_otherwise() {
        let ids: [u8; 24] = std::array::from_fn(|i| i as u8 + 1);
        let child = TraceParent::for_request([VALID.as_bytes()], ids, false);
        assert_eq!(child.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(child.span_id, ids[16..]);
        assert_eq!(child.flags, 1);
        let unsampled = VALID.replace("-01", "-00");
        assert_eq!(
            TraceParent::for_request([unsampled.as_bytes()], ids, true).flags,
            0,
            "a parent's flags are kept, whatever a new trace would be"
        );

        let root = TraceParent::root(ids, true);
        assert_eq!(root.trace_id, ids[..16]);
        assert_eq!(root.flags, SAMPLED);
        assert_eq!(TraceParent::root(ids, false).flags, 0);
        assert!(TraceParent::root(ids, false).to_string().ends_with("-00"));
        let none: [&[u8]; 0] = [];
        assert_eq!(TraceParent::for_request(none, ids, true), root);
        assert_eq!(
            TraceParent::for_request([b"garbage".as_slice()], ids, true),
            root
        );
        // Two traceparent headers are as good as none.
        assert_eq!(
            TraceParent::for_request([VALID.as_bytes(), VALID.as_bytes()], ids, true),
            root
        );
        // All-zero random bytes still make valid ids.
        let zero = TraceParent::root([0; 24], true);
        assert!(TraceParent::parse(&zero.to_string()).is_some());
    }

    proptest! {
        #[test]
        fn every_built_value_parses_back(ids in any::<[u8; 24]>(), parent in any::<bool>()) {
            let built = if parent {
                TraceParent::for_request([VALID.as_bytes()], ids, false)
            } else {
                TraceParent::root(ids, ids[0] % 2 == 0)
            };
            let text = built.to_string();
            prop_assert_eq!(text.len(), 55);
            prop_assert_eq!(TraceParent::parse(&text), Some(built));
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,80}") {
            let _ = TraceParent::parse(&text);
        }
    }
}
