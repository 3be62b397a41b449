//! A NATS message as it goes on the wire, shared by every module that builds, spools or
//! publishes one: [`NatsMessage`], and [`wire_size`], the one count of the bytes NATS holds
//! against `max_payload`; and [`StoredMark`], one message JetStream acknowledged, which the
//! publisher notes and the spool keeps. A leaf: it imports nothing from the crate.

use bytes::Bytes;

/// One message to publish (and, when NATS cannot take it, to spool): subject, headers and
/// body exactly as they go on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsMessage {
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

impl NatsMessage {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// See [`wire_size`].
    pub fn wire_size(&self) -> usize {
        wire_size(
            self.headers.iter().map(|(n, v)| (n.len(), v.len())),
            self.payload.len(),
        )
    }
}

/// The size NATS counts against `max_payload` for a message with headers of these (name,
/// value) lengths and a payload of `payload` bytes: the serialised header block
/// (`NATS/1.0\r\n`, `Name: value\r\n` each, the closing `\r\n`) plus the payload. Every
/// message of the service carries headers; one without would be counted 12 bytes too many,
/// which errs on the safe side.
pub fn wire_size(headers: impl IntoIterator<Item = (usize, usize)>, payload: usize) -> usize {
    let block: usize = headers
        .into_iter()
        .map(|(name, value)| name + 2 + value + 2)
        .sum();
    "NATS/1.0\r\n".len() + block + 2 + payload
}

/// One message JetStream acknowledged: its place in the stream, its `Nats-Msg-Id`, and when
/// the acknowledgement came (ms since the Unix epoch). A power cut rolls a server's store back
/// to a moment, keeping a prefix of the stream: if the stream still holds this message at its
/// sequence after a restart, it kept everything stored before it, and only what was
/// acknowledged after it can be lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMark {
    pub sequence: u64,
    pub msg_id: String,
    pub at_ms: u64,
}

impl StoredMark {
    /// The form the spool's heartbeat file keeps: `<sequence> <msg id> <at_ms>`.
    pub fn to_text(&self) -> String {
        format!("{} {} {}", self.sequence, self.msg_id, self.at_ms)
    }

    /// Reads [`StoredMark::to_text`]'s form; `None` for anything else (a torn file).
    pub fn from_text(text: &str) -> Option<StoredMark> {
        let mut fields = text.split(' ');
        let mark = StoredMark {
            sequence: fields.next()?.parse().ok()?,
            msg_id: fields.next().filter(|id| !id.is_empty())?.to_owned(),
            at_ms: fields.next()?.parse().ok()?,
        };
        fields.next().is_none().then_some(mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_is_the_serialised_header_block_plus_the_payload() {
        let message = NatsMessage {
            subject: "s".into(),
            headers: vec![("Nats-Msg-Id".into(), "abc".into())],
            payload: Bytes::from_static(b"{}"),
        };
        let block = "NATS/1.0\r\nNats-Msg-Id: abc\r\n\r\n";
        assert_eq!(message.wire_size(), block.len() + 2);
        assert_eq!(wire_size([], 7), "NATS/1.0\r\n\r\n".len() + 7);
        assert_eq!(message.header("nats-msg-id"), Some("abc"));
    }

    #[test]
    fn a_stored_mark_reads_back_from_its_text_and_a_torn_one_errs_on_the_safe_side() {
        let mark = StoredMark {
            sequence: 42,
            msg_id: "ab12".into(),
            at_ms: 1_700_000_000_000,
        };
        assert_eq!(StoredMark::from_text(&mark.to_text()), Some(mark.clone()));
        let text = mark.to_text();
        // Torn anywhere, it is unreadable, or it is the same message acknowledged earlier
        // (more is published again, never less).
        for cut in 0..text.len() {
            if let Some(torn) = StoredMark::from_text(&text[..cut]) {
                assert_eq!((torn.sequence, &torn.msg_id), (42, &mark.msg_id), "{cut}");
                assert!(torn.at_ms < mark.at_ms, "{cut}");
            }
        }
        assert_eq!(StoredMark::from_text(&format!("{text} 7")), None);
    }
}
