//! Integration tests: the real service on port 0 against real `nats-server` processes.
//! One test binary keeps link time down; one module per feature.

mod bodies;
mod conformance;
mod consumer;
mod deadletter;
mod delivery;
mod faults;
mod helpers;
mod hostile;
mod http;
mod inbound;
mod lazy_helpers;
mod lazyfs;
mod limits;
mod metric_names;
mod pipeline;
mod power;
mod props;
#[path = "../chaos/proxy.rs"]
mod proxy;
mod reload;
mod secure;
mod shape;
mod trace;
