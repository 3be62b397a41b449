//! Every metric name the dashboard and the alert rules use is one the real binary exposes on
//! `/metrics`: a panel or an alert on a name nobody exports is silently empty.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::helpers::*;

/// The files whose metric names must exist, relative to the crate.
const USERS: [&str; 2] = [
    "deploy/monitoring/dashboard.json",
    "deploy/monitoring/alerts.yml",
];

/// Every `cmc_forwarder_…` name in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("cmc_forwarder_") {
        let boundary = at == 0 || {
            let before = rest.as_bytes()[at - 1];
            !(before.is_ascii_alphanumeric() || before == b'_')
        };
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if boundary {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// Series names of a Prometheus text page (a histogram gives `_bucket`, `_sum`, `_count`).
fn exposed_names(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.split(['{', ' ']).next().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn names_are_read_whole_and_only_on_a_word_boundary() {
    let used =
        names_in(r#"rate(cmc_forwarder_requests_total{status="200"}[5m]) / xcmc_forwarder_no"#);
    assert_eq!(
        used.into_iter().collect::<Vec<_>>(),
        ["cmc_forwarder_requests_total"]
    );
    let page = "# HELP a b\ncmc_forwarder_x_bucket{le=\"1\"} 1\ncmc_forwarder_y 2\n";
    assert_eq!(
        exposed_names(page).into_iter().collect::<Vec<_>>(),
        ["cmc_forwarder_x_bucket", "cmc_forwarder_y"]
    );
}

/// Every metric name the dashboard and the alert rules use, with the files using it.
fn used_names() -> BTreeMap<String, Vec<&'static str>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut used: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for file in USERS {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for name in names_in(&text) {
            used.entry(name).or_default().push(file);
        }
    }
    assert!(used.len() > 5, "the files name metrics: {used:?}");
    used
}

/// The names of `used` that `page` does not expose, each with the files using it.
fn missing_from(used: &BTreeMap<String, Vec<&str>>, page: &str) -> Vec<String> {
    let exposed = exposed_names(page);
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| !exposed.contains(*name))
        .map(|(name, files)| format!("{name} (used in {})", files.join(", ")))
        .collect();
    println!(
        "{} metric names used, {} series names exposed, {} missing",
        used.len(),
        exposed.len(),
        missing.len()
    );
    missing
}

/// Issue 29: a panel or an alert must not say "no data" on a service that has not been
/// posted to yet: every name is on `/metrics` from start-up, every series whose labels are
/// known then at 0 (one per configured API key, one per status code the service answers).
#[tokio::test]
async fn every_metric_of_the_dashboard_and_the_alerts_is_exposed_before_any_request() {
    // Arrange
    let used = used_names();
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut service = Launch::service(&dir.path().join("service.log"))
        .nats(&nats.url())
        .spool(&dir.path().join("spool"))
        .setting("AUTH__API_KEY", "metric-names-key")
        .start();
    let http = http_client();
    service.wait_ready(&http).await;

    // Act: no request but the scrape.
    let page = get_text(
        &http,
        &format!("http://127.0.0.1:{}/metrics", service.admin_port),
    )
    .await;

    // Assert
    let missing = missing_from(&used, &page);
    assert!(missing.is_empty(), "not exposed by /metrics: {missing:#?}");
    for series in [
        r#"cmc_forwarder_api_key_requests_total{key="0"} 0"#,
        r#"cmc_forwarder_http_requests_total{code="200"} 0"#,
        r#"cmc_forwarder_http_requests_total{code="503"} 0"#,
        r#"cmc_forwarder_events_total{event_type="deliveries",status="queued",outcome="published"} 0"#,
    ] {
        assert!(page.lines().any(|l| l == series), "no {series} in\n{page}");
    }
}

#[tokio::test]
async fn every_metric_of_the_dashboard_and_the_alerts_is_exposed_by_the_service() {
    // Arrange: dead letters and an API key on, so every kind of series can exist.
    let used = used_names();
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut service = Launch::service(&dir.path().join("service.log"))
        .nats(&nats.url())
        .spool(&dir.path().join("spool"))
        .setting("VALIDATION__INVALID_ENTRIES", "dead_letter")
        .setting("AUTH__API_KEY", "metric-names-key")
        .start();
    let http = http_client();
    service.wait_ready(&http).await;
    let post = |body: String| {
        http.post(service.webhook_url())
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let batch = |entries: &str| {
        format!(
            r#"{{"event_type":"deliveries","server_composition":"pro","api_key":"metric-names-key","event":{{"deliveries":[{entries}]}}}}"#
        )
    };

    // Act: a valid batch, one with invalid entries, a malformed body; then scrape.
    let ok = post(batch(r#"{"status":"queued"},{"status":"failed"}"#))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let dead = post(batch(r#"{"status":"queued"},"not an object",{"to":"x"}"#))
        .await
        .unwrap();
    assert_eq!(json(dead).await["invalid"], 2);
    assert_eq!(post("{".into()).await.unwrap().status(), 400);
    let page = get_text(
        &http,
        &format!("http://127.0.0.1:{}/metrics", service.admin_port),
    )
    .await;

    // Assert
    let missing = missing_from(&used, &page);
    assert!(missing.is_empty(), "not exposed by /metrics: {missing:#?}");
}
