//! Routing and request checks: public routes, 404/405, body size, JSON, and the order in which
//! the checks apply (route, method, auth, body size, JSON, RBAC).

use serde_json::json;

use crate::runs_support::RunsApi;
use crate::util::*;

fn assert_error_json(resp: &Response, status: u16) {
    assert_eq!(resp.status, status, "body: {}", resp.text());
    let body = resp.json();
    assert_eq!(body["success"], json!(false), "body: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "error must be a non-empty string: {body}"
    );
}

fn marker_runbook(server_root_marker: &str) -> Runbook {
    Runbook::new(
        "Marker",
        &format!("echo ran > '{server_root_marker}'\necho ok\n"),
    )
}

#[test]
fn healthz_is_public_and_ok() {
    let server = Server::start(ServerOpts::new());
    let resp = server.get("/healthz", None);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json(), json!({"status": "ok"}));
    assert!(resp
        .header("Content-Type")
        .is_some_and(|c| c.contains("application/json")));
}

#[test]
fn unknown_routes_are_404_json() {
    let server = Server::start(ServerOpts::new());
    for path in [
        "/nope",
        "/api/nothing-here",
        "/api/runbooks/a.md/unknown-action",
    ] {
        let resp = server.get(path, Some(&dev_token()));
        assert_error_json(&resp, 404);
    }
    // Route is checked before auth: no token on an unknown route is still 404.
    let resp = server.get("/api/nothing-here", None);
    assert_error_json(&resp, 404);
}

#[test]
fn wrong_method_is_405_with_allow() {
    let server =
        Server::start(ServerOpts::new().runbook("Hello.md", Runbook::new("Hello", "echo hi")));
    let tok = format!("Bearer {}", dev_token());
    let cases: [(&str, &str, &str); 4] = [
        ("DELETE", "/healthz", "GET"),
        ("POST", "/api/runbooks", "GET"),
        ("GET", "/api/runbooks/Hello.md/execute", "POST"),
        ("POST", "/api/runbooks/Hello.md/validate", "PATCH"),
    ];
    for (method, path, allowed) in cases {
        let resp = server.request(method, path, &[("Authorization", &tok)], None);
        assert_error_json(&resp, 405);
        let allow = resp
            .header("Allow")
            .unwrap_or_else(|| panic!("{method} {path}: 405 without Allow"));
        assert!(
            allow.split(',').any(|m| m.trim() == allowed),
            "{method} {path}: Allow {allow:?} should list {allowed}"
        );
    }
}

#[test]
fn order_route_before_method_before_auth() {
    let server = Server::start(ServerOpts::new());
    // Unknown route with an odd method and no token: 404.
    let resp = server.request("DELETE", "/api/nothing-here", &[], None);
    assert_error_json(&resp, 404);
    // Known route, wrong method, no token: 405, not 401.
    let resp = server.request("DELETE", "/api/runbooks", &[], None);
    assert_error_json(&resp, 405);
    assert!(resp.header("Allow").is_some());
}

#[test]
fn body_over_one_mib_is_413_and_runs_nothing() {
    let server = Server::start(ServerOpts::new());
    let marker = server.root.join("marker");
    std::fs::write(
        server.runbooks_dir().join("Marker.md"),
        marker_runbook(&marker.display().to_string()).render(),
    )
    .unwrap();
    let auth = format!("Bearer {}", dev_token());
    let mut body = br#"{"env_vars":{}}"#.to_vec();
    body.resize(1024 * 1024 + 1, b' ');
    let resp = server.request(
        "POST",
        "/api/runbooks/Marker.md/execute",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(&body),
    );
    assert_error_json(&resp, 413);
    // A sync execute answers after its run has ended, and every run is registered before its
    // script starts: with the answer in, no run on record means none was started.
    assert!(
        server.list_runs("", &dev_token()).is_empty(),
        "an over-size request must not start a run"
    );
    assert!(
        !marker.exists(),
        "an over-size request must not run the script"
    );
    assert!(server.history_entries("Marker.md").is_empty());
}

#[test]
fn body_under_one_mib_is_accepted() {
    let server =
        Server::start(ServerOpts::new().runbook("Hello.md", Runbook::new("Hello", "echo hi")));
    let auth = format!("Bearer {}", dev_token());
    let mut body = br#"{"env_vars":{}}"#.to_vec();
    body.resize(1_000_000, b' ');
    let resp = server.request(
        "POST",
        "/api/runbooks/Hello.md/execute",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(&body),
    );
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    assert_eq!(resp.json()["stdout"], json!("hi\n"));
}

#[test]
fn chunked_body_over_one_mib_is_413() {
    let server =
        Server::start(ServerOpts::new().runbook("Hello.md", Runbook::new("Hello", "echo hi")));
    let auth = format!("Bearer {}", dev_token());
    let mut payload = br#"{"env_vars":{}}"#.to_vec();
    payload.resize(1024 * 1024 + 4096, b' ');
    let mut framed = Vec::new();
    for piece in payload.chunks(60_000) {
        framed.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        framed.extend_from_slice(piece);
        framed.extend_from_slice(b"\r\n");
    }
    framed.extend_from_slice(b"0\r\n\r\n");
    let resp = server.request(
        "POST",
        "/api/runbooks/Hello.md/execute",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("Transfer-Encoding", "chunked"),
        ],
        Some(&framed),
    );
    assert_error_json(&resp, 413);
    assert!(server.history_entries("Hello.md").is_empty());
}

#[test]
fn bad_json_is_400() {
    let server =
        Server::start(ServerOpts::new().runbook("Hello.md", Runbook::new("Hello", "echo hi")));
    let auth = format!("Bearer {}", dev_token());
    for body in [&b"{not json"[..], b"{\"env_vars\": \"text\"}", b"[1,2]"] {
        let resp = server.request(
            "POST",
            "/api/runbooks/Hello.md/execute",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            Some(body),
        );
        assert_error_json(&resp, 400);
    }
    let resp = server.request(
        "PATCH",
        "/api/runbooks/Hello.md/validate",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(b"{\"env_vars\": "),
    );
    assert_error_json(&resp, 400);
    assert!(
        server.history_entries("Hello.md").is_empty(),
        "no run for a bad body"
    );
}

#[test]
fn order_auth_before_body_size() {
    let server =
        Server::start(ServerOpts::new().runbook("Hello.md", Runbook::new("Hello", "echo hi")));
    let mut body = br#"{"env_vars":{}}"#.to_vec();
    body.resize(2 * 1024 * 1024, b' ');
    let resp = server.request(
        "POST",
        "/api/runbooks/Hello.md/execute",
        &[("Content-Type", "application/json")],
        Some(&body),
    );
    assert_error_json(&resp, 401);
    // Huge body with a bad JSON prefix and a valid token: size is checked before JSON.
    let auth = format!("Bearer {}", dev_token());
    let mut bad = b"{not json".to_vec();
    bad.resize(2 * 1024 * 1024, b' ');
    let resp = server.request(
        "POST",
        "/api/runbooks/Hello.md/execute",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(&bad),
    );
    assert_error_json(&resp, 413);
}

#[test]
fn order_body_checks_before_rbac() {
    let server = Server::start(ServerOpts::new().runbook(
        "Admin.md",
        Runbook::new("Admin", "echo admin only").claim("roles: admin"),
    ));
    let auth = format!("Bearer {}", dev_token());
    // Bad JSON and an RBAC failure: 400, and no 403 history entry.
    let resp = server.request(
        "POST",
        "/api/runbooks/Admin.md/execute",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(b"{broken"),
    );
    assert_error_json(&resp, 400);
    // Oversized body and an RBAC failure: 413.
    let mut body = br#"{"env_vars":{}}"#.to_vec();
    body.resize(1024 * 1024 + 10, b' ');
    let resp = server.request(
        "POST",
        "/api/runbooks/Admin.md/execute",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(&body),
    );
    assert_error_json(&resp, 413);
    assert!(
        server.history_entries("Admin.md").is_empty(),
        "body failures come before RBAC, so no 403 entry: {}",
        server.read_runbook("Admin.md")
    );
    // And then the RBAC failure itself with a good body.
    let resp = server.execute("Admin.md", &dev_token(), json!({}));
    assert_error_json(&resp, 403);
}

#[test]
fn execute_of_missing_runbook_is_404_json_even_for_sse() {
    let server = Server::start(ServerOpts::new());
    let resp = server.execute("Missing.md", &dev_token(), json!({}));
    assert_error_json(&resp, 404);
    let auth = format!("Bearer {}", dev_token());
    let resp = server.request(
        "POST",
        "/api/runbooks/Missing.md/execute",
        &[
            ("Authorization", &auth),
            ("Accept", "text/event-stream"),
            ("Content-Type", "application/json"),
        ],
        Some(b"{}"),
    );
    assert_error_json(&resp, 404);
    assert!(resp
        .header("Content-Type")
        .is_some_and(|c| c.contains("application/json")));
}
