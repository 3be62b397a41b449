//! A NATS message as it goes on the wire, shared by every module that builds, spools or
//! publishes one: [`NatsMessage`], and [`wire_size`], the one count of the bytes NATS holds
//! against `max_payload`; and [`StoredMark`], one message JetStream acknowledged, which the
//! publisher notes and the retained log's keeper checks. A leaf: it imports nothing from the crate.

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

/// One message JetStream acknowledged: its place in the stream and its `Nats-Msg-Id`. The
/// retained log's keeper asks at its next check whether the stream still holds it there:
/// another id, or none, means the stream lost its tail since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMark {
    pub sequence: u64,
    pub msg_id: String,
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
}
