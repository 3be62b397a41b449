//! Fuzzes the pure webhook core: any body, in both encodings, through decode, validate and
//! rendering. It must never panic, and whatever it accepts must render to well-formed
//! messages: one per entry, in order, on subjects of escaped tokens only.

#![no_main]

use cmc_forwarder::subject::SubjectTemplate;
use cmc_forwarder::webhook::decode;
use libfuzzer_sys::fuzz_target;

const CONTENT_TYPES: [&str; 2] = ["application/json", "application/x-www-form-urlencoded"];

fuzz_target!(|data: &[u8]| {
    let template = SubjectTemplate::parse("cmc.{event_type}.{status}").unwrap();
    for content_type in CONTENT_TYPES {
        let Ok(decoded) = decode(Some(content_type), data) else {
            continue;
        };
        let _ = decoded.api_key();
        let Ok(batch) = decoded.validate() else {
            continue;
        };
        let out = batch.to_outgoing(&template, "fuzz");
        assert_eq!(out.messages.len(), batch.entries.len());
        for (i, message) in out.messages.iter().enumerate() {
            assert_eq!(message.index, i);
            let tokens: Vec<&str> = message.subject.split('.').collect();
            assert_eq!(tokens.len(), 3, "{}", message.subject);
            assert!(tokens.iter().all(|t| !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-%".contains(&b))));
            let body: serde_json::Map<String, serde_json::Value> =
                match serde_json::from_slice(&message.payload) {
                    Ok(body) => body,
                    // Entries nested deeper than serde_json's own limit (128) are forwarded
                    // verbatim; that is not this target's concern.
                    Err(e) if e.to_string().contains("recursion limit") => continue,
                    Err(e) => panic!("the body is not a JSON object: {e}"),
                };
            let keys: Vec<&str> = body.keys().take(2).map(String::as_str).collect();
            assert_eq!(keys, ["event_type", "server_composition"]);
            assert!(
                !body.contains_key("api_key") || batch.entries[i].fields.get("api_key").is_some()
            );
            for (_, value) in out.headers(message) {
                let value = value.to_string();
                assert!(
                    value.bytes().all(|b| (0x20..0x7f).contains(&b)),
                    "{value:?}"
                );
            }
        }
    }
});
