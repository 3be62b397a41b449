//! Micro-benchmarks of the pure core: decode + validate + split + render, per encoding and
//! batch size. `cargo bench --bench core`.

use std::hint::black_box;

use cmc_forwarder::subject::SubjectTemplate;
use cmc_forwarder::webhook::decode;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn entry(i: usize) -> serde_json::Value {
    let statuses = ["queued", "succeeded", "failed", "deferred"];
    serde_json::json!({
        "reason": if i % 4 == 2 { "550 5.1.1 The email account that you tried to reach does not exist." } else { "" },
        "sourceIp": "100.100.100.1",
        "returnPath": "info@return.pro.smtps.jp",
        "created": "2023-01-25 14:03:06",
        "subject": "メールマガジンのテスト",
        "apiData": "",
        "messageId": format!("<{i:020}@example.com>"),
        "from": "info@example.com",
        "to": format!("user{i:05}@example.jp"),
        "senderIp": "100.100.100.3",
        "status": statuses[i % 4],
    })
}

fn bodies(batch: usize) -> (Vec<u8>, Vec<u8>) {
    let event = serde_json::json!({ "deliveries": (0..batch).map(entry).collect::<Vec<_>>() });
    let json = serde_json::json!({"event_type": "deliveries", "server_composition": "pro", "event": event});
    let event_text = event
        .to_string()
        .replace('<', "\\u003C")
        .replace('>', "\\u003E");
    let encoded: String = event_text
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                (b as char).to_string()
            }
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let form = format!("server_composition=pro&event_type=deliveries&event={encoded}");
    (json.to_string().into_bytes(), form.into_bytes())
}

fn core(c: &mut Criterion) {
    let template = SubjectTemplate::parse("cmc.{event_type}.{status}").unwrap();
    let mut group = c.benchmark_group("decode_validate_split");
    for batch in [1usize, 10, 100, 1000] {
        let (json, form) = bodies(batch);
        group.throughput(Throughput::Elements(batch as u64));
        for (name, ct, body) in [
            ("json", "application/json", &json),
            ("form", "application/x-www-form-urlencoded", &form),
        ] {
            group.bench_with_input(BenchmarkId::new(name, batch), body, |b, body| {
                b.iter(|| {
                    let decoded = decode(Some(ct), black_box(body)).unwrap();
                    let batch = decoded.validate().unwrap();
                    black_box(batch.to_outgoing(&template, "batch"))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, core);
criterion_main!(benches);
