//! The power-loss emulation the durability tests stand on: nats-server acknowledges a
//! JetStream publish before it syncs its store, so a power cut leaves the store as it was at
//! its last sync. [`NatsServer::last_sync`] and [`NatsServer::lose_power`] emulate that (a copy
//! taken while the server is paused, put back after a SIGKILL); these tests show they lose
//! exactly what came after the copy, so a test built on them cannot pass for the wrong reason.

use async_nats::jetstream;

use crate::helpers::*;

async fn stream_count(js: &jetstream::Context, name: &str) -> Option<u64> {
    let mut stream = js.get_stream(name).await.ok()?;
    Some(stream.info().await.ok()?.state.messages)
}

async fn create_stream(js: &jetstream::Context) {
    js.create_stream(jetstream::stream::Config {
        name: "POWER".into(),
        subjects: vec!["power.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn publish_acked(js: &jetstream::Context, from: usize, to: usize) {
    for i in from..to {
        js.publish(format!("power.{i}"), "x".into())
            .await
            .unwrap()
            .await
            .expect("acknowledged");
    }
}

#[tokio::test]
async fn a_power_cut_loses_every_acknowledged_message_after_the_last_sync() {
    // Arrange: 10 acknowledged messages, the "last sync", 10 more acknowledged.
    let mut nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    create_stream(&js).await;
    publish_acked(&js, 0, 10).await;
    let sync = nats.last_sync();
    publish_acked(&js, 10, 20).await;
    assert_eq!(stream_count(&js, "POWER").await, Some(20));

    // Act
    nats.lose_power(&sync).await;

    // Assert: the 10 acknowledged after the sync are gone.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    assert_eq!(stream_count(&js, "POWER").await, Some(10));
}

#[tokio::test]
async fn a_power_cut_before_the_first_sync_of_a_stream_loses_the_stream() {
    let mut nats = NatsServer::start().await;
    let sync = nats.last_sync();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    create_stream(&js).await;
    publish_acked(&js, 0, 5).await;

    nats.lose_power(&sync).await;

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    assert_eq!(stream_count(&js, "POWER").await, None, "the stream is gone");
}
