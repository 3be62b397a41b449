//! Prints every message published under a subject, with its headers.
//!
//! ```text
//! cargo run --example watch                          # cmc.> on nats://127.0.0.1:4222
//! cargo run --example watch -- 'cmc.bounces.>' nats://nats.example:4222
//! ```

use futures_util::StreamExt;

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let mut args = std::env::args().skip(1);
    let subject = args.next().unwrap_or_else(|| "cmc.>".into());
    let server = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let client = async_nats::connect(&server).await?;
    let mut messages = client.subscribe(subject.clone()).await?;
    eprintln!("watching {subject} on {server} (Ctrl-C to stop)");
    while let Some(message) = messages.next().await {
        println!("── {}", message.subject);
        if let Some(headers) = &message.headers {
            for (name, values) in headers.iter() {
                for value in values {
                    println!("   {name}: {}", value.as_str());
                }
            }
        }
        println!("   {}", String::from_utf8_lossy(&message.payload));
    }
    Ok(())
}
