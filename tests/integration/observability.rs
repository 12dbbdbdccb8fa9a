//! GET /api/config, GET /metrics and GET /docs/openapi.yaml.

use std::time::Duration;

use serde_json::{json, Value};

use crate::util::*;

fn item<'a>(items: &'a [Value], name: &str) -> &'a Value {
    items
        .iter()
        .find(|i| i["name"] == json!(name))
        .unwrap_or_else(|| panic!("no config item {name}: {items:?}"))
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[test]
fn config_shows_sources_and_hides_secrets() {
    let server = Server::start(ServerOpts::new().env("HEARTBEAT_SECONDS", "7"));
    let resp = server.get(
        "/api/config",
        Some(&token("cfg-user", &["developer", "ops"])),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    let items = body["config_items"].as_array().unwrap().clone();
    let secret = item(&items, "JWT_SECRET");
    assert_eq!(secret["value"], json!("secret"), "{secret}");
    assert_eq!(secret["from"], json!("environment"));
    assert!(!body.to_string().contains(TEST_SECRET), "the secret leaked");
    let hb = item(&items, "HEARTBEAT_SECONDS");
    assert_eq!(value_text(&hb["value"]), "7");
    assert_eq!(hb["from"], json!("environment"));
    let max = item(&items, "MAX_OUTPUT_SIZE_BYTES");
    assert_eq!(value_text(&max["value"]), "10485760");
    assert_eq!(max["from"], json!("default"));
    let port = item(&items, "API_PORT");
    assert_eq!(port["from"], json!("environment"));
    for i in &items {
        assert!(
            i["from"] == json!("default") || i["from"] == json!("environment"),
            "{i}"
        );
    }
    let tok = &body["token"];
    assert_eq!(tok["user_id"], json!("cfg-user"), "{tok}");
    let roles = tok["roles"].to_string();
    assert!(
        roles.contains("developer") && roles.contains("ops"),
        "{tok}"
    );
    assert_eq!(tok["remote_ip"], json!("127.0.0.1"), "{tok}");
    assert_eq!(tok["claims"]["sub"], json!("cfg-user"), "{tok}");
    assert_eq!(server.get("/api/config", None).status, 401);
}

fn sample_total(metrics: &str, pred: impl Fn(&str) -> bool) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter(|l| pred(l.split(['{', ' ']).next().unwrap_or("")))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[test]
fn metrics_count_requests_and_runs() {
    let server = Server::start(
        ServerOpts::new()
            .runbook("Ok.md", Runbook::new("Ok", "echo ok"))
            .runbook("Bad.md", Runbook::new("Bad", "exit 1")),
    );
    assert_eq!(server.execute("Ok.md", &dev_token(), json!({})).status, 200);
    assert_eq!(server.execute("Ok.md", &dev_token(), json!({})).status, 200);
    assert_eq!(
        server.execute("Bad.md", &dev_token(), json!({})).status,
        500
    );
    // A request is counted once its response is written, so the last execute's count may
    // trail its answer by a moment: read until it shows (or the bound runs out).
    let read_metrics = || {
        let resp = server.get("/metrics", None);
        assert_eq!(resp.status, 200);
        assert!(resp
            .header("Content-Type")
            .is_some_and(|c| c.starts_with("text/plain")));
        resp.text()
    };
    let mut text = read_metrics();
    wait_until(Duration::from_secs(10), || {
        text = read_metrics();
        sample_total(&text, |name| name.contains("request")) >= 4.0
    });
    assert!(text.contains("# TYPE"), "Prometheus text format: {text}");
    let started = sample_total(&text, |name| name.contains("run") && name.contains("start"));
    assert!(started >= 3.0, "runs started counter >= 3: {text}");
    let finished = sample_total(&text, |name| {
        name.contains("run") && name.contains("finish")
    });
    assert!(finished >= 3.0, "runs finished counter >= 3: {text}");
    let requests = sample_total(&text, |name| name.contains("request"));
    assert!(requests >= 3.0, "request counter: {text}");
    assert!(
        text.lines()
            .any(|l| !l.starts_with('#') && l.contains("run") && l.contains("running")),
        "runs running gauge: {text}"
    );
}

#[test]
fn openapi_document_is_served() {
    let server = Server::start(ServerOpts::new());
    let resp = server.get("/docs/openapi.yaml", None);
    assert_eq!(resp.status, 200);
    let text = resp.text();
    assert!(
        text.lines().any(|l| l.starts_with("openapi: 3")
            || l.starts_with("openapi: \"3")
            || l.starts_with("openapi: '3")),
        "OpenAPI 3 document: {}",
        &text[..text.len().min(300)]
    );
    for route in [
        "/healthz",
        "/dev-login",
        "/api/runbooks",
        "/api/runbooks/{",
        "/required-env",
        "/validate",
        "/execute",
        "/api/config",
        "/metrics",
    ] {
        assert!(text.contains(route), "route {route} documented");
    }
}
