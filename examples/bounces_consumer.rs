//! A downstream bounce handler: a durable JetStream pull consumer on the stream `CMC_EVENTS`,
//! filtered to `cmc.bounces.>`, that prints each bounced address with the bounce code's name
//! and the SMTP reason, then acknowledges the message.
//!
//! ```text
//! cargo run --example bounces_consumer                       # nats://127.0.0.1:4222, consumer "bounces", forever
//! cargo run --example bounces_consumer -- nats://a:4222,nats://b:4222 bounce-handler 10
//!                                          SERVERS             CONSUMER       stop after N messages
//! ```
//!
//! The consumer is durable: the server remembers what it acknowledged, so a restart resumes
//! after the last acknowledged bounce, and several copies sharing one consumer name share the
//! work. A message is acknowledged only after it was handled; one that is not acknowledged
//! within the consumer's `ack_wait` (30 s) is delivered again. Output, one line per bounce,
//! tab-separated (address, name and code, reason):
//!
//! ```text
//! no-user@example.jp  user_unknown (2)  550 5.1.1 The email account that you tried to reach …
//! ```

use async_nats::jetstream::{self, consumer, AckKind};
use futures_util::StreamExt;

/// The stream the forwarder writes to (`nats.stream.name`).
pub const STREAM: &str = "CMC_EVENTS";
/// Every bounce, whatever its code (`nats.subject` = `cmc.{event_type}.{status}`).
pub const FILTER: &str = "cmc.bounces.>";

/// What a bounce handler needs from one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounce {
    /// The address that bounced (`to`; version-1 payloads call it `envelopeTo`).
    pub address: String,
    /// CMC's error-status code, e.g. `2`.
    pub code: String,
    /// Its readable name, e.g. `user_unknown`.
    pub name: &'static str,
    /// The receiving server's SMTP answer.
    pub reason: String,
}

impl std::fmt::Display for Bounce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\t{} ({})\t{}",
            self.address, self.name, self.code, self.reason
        )
    }
}

impl Bounce {
    /// Reads a bounce from a message's headers and JSON body. The code comes from the
    /// `Cmc-Status` header when present (no need to parse the body to route on it), else from
    /// the body's `status`, which CMC sends as a string but may send as a number.
    pub fn from_message(message: &async_nats::Message) -> Result<Bounce, String> {
        let body: serde_json::Value = serde_json::from_slice(&message.payload)
            .map_err(|e| format!("body is not JSON: {e}"))?;
        let text = |key: &str| body.get(key).and_then(|v| v.as_str()).map(str::to_owned);
        let code = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Cmc-Status"))
            .map(|v| v.as_str().to_owned())
            .or_else(|| match body.get("status") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                _ => None,
            })
            .ok_or("no Cmc-Status header and no status field")?;
        Ok(Bounce {
            address: text("to")
                .or_else(|| text("envelopeTo"))
                .ok_or("no to or envelopeTo field")?,
            // The same table the forwarder uses for `{status_name}` subjects, so names match.
            name: cmc_forwarder::subject::bounce_status_name(&code),
            code,
            reason: text("reason").unwrap_or_default(),
        })
    }
}

/// The durable consumer's configuration.
pub fn consumer_config(name: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        description: Some("bounce handler: cmc-forwarder examples/bounces_consumer.rs".into()),
        filter_subject: FILTER.into(),
        // Explicit acks: a bounce counts as handled only once we say so.
        ack_policy: consumer::AckPolicy::Explicit,
        // A new consumer starts at the first stored bounce, not only at new ones.
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

/// Handles bounces from the durable consumer `name` (created when missing), calling `handle`
/// for each and acknowledging it afterwards; returns after `max` messages, or never when `max`
/// is `None`. Messages that are no bounce (undecodable body, no address) are reported on
/// stderr and terminated, so they are not redelivered forever.
pub async fn consume(
    js: &jetstream::Context,
    name: &str,
    max: Option<usize>,
    mut handle: impl FnMut(&Bounce),
) -> Result<usize, async_nats::Error> {
    let stream = js.get_stream(STREAM).await?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(name, consumer_config(name))
        .await?;
    let mut messages = consumer.messages().await?;
    let mut handled = 0;
    while max.is_none_or(|max| handled < max) {
        let Some(message) = messages.next().await else {
            break;
        };
        let message = message?;
        match Bounce::from_message(&message) {
            Ok(bounce) => {
                handle(&bounce);
                // double_ack waits until the server recorded the ack, so a bounce handled just
                // before exiting is not delivered again.
                message.double_ack().await?;
            }
            Err(why) => {
                eprintln!("skipping {}: {why}", message.subject);
                message.ack_with(AckKind::Term).await?;
            }
        }
        handled += 1;
    }
    Ok(handled)
}

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let mut args = std::env::args().skip(1);
    let servers = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let name = args.next().unwrap_or_else(|| "bounces".into());
    let max = args.next().map(|n| n.parse::<usize>()).transpose()?;
    // A comma-separated list: the client fails over between the servers of the cluster.
    let servers: Vec<&str> = servers.split(',').map(str::trim).collect();
    let client = async_nats::connect(servers.as_slice()).await?;
    let js = jetstream::new(client);
    eprintln!("consumer {name} on {STREAM} ({FILTER}); Ctrl-C to stop");
    consume(&js, &name, max, |bounce| println!("{bounce}")).await?;
    Ok(())
}
