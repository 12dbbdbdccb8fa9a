//! Authentication (JWT checks and their 401s), POST /dev-login, and RBAC through
//! `# Required Claims`.

use serde_json::{json, Value};

use crate::util::*;

fn assert_401(resp: &Response, what: &str) {
    assert_eq!(resp.status, 401, "{what}: body {}", resp.text());
    let body = resp.json();
    assert_eq!(body["success"], json!(false), "{what}: {body}");
    assert!(body["error"].is_string(), "{what}: {body}");
    let www = resp
        .header("WWW-Authenticate")
        .unwrap_or_else(|| panic!("{what}: 401 without WWW-Authenticate"));
    assert!(www.starts_with("Bearer"), "{what}: {www:?}");
    assert!(www.contains("error=\"invalid_token\""), "{what}: {www:?}");
}

fn with_claim(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

#[test]
fn missing_or_malformed_tokens_are_401() {
    let server = Server::start(ServerOpts::new());
    assert_401(&server.get("/api/runbooks", None), "no Authorization");
    for header in [
        "Bearer",
        "Bearer not-a-jwt",
        "Bearer a.b.c",
        "Basic dXNlcjpwYXNz",
    ] {
        let resp = server.request("GET", "/api/runbooks", &[("Authorization", header)], None);
        assert_401(&resp, header);
    }
    // The raw token without the Bearer scheme is not accepted either.
    let resp = server.request(
        "GET",
        "/api/runbooks",
        &[("Authorization", &dev_token())],
        None,
    );
    assert_401(&resp, "token without scheme");
}

#[test]
fn bad_tokens_are_401() {
    let server = Server::start(ServerOpts::new());
    let good = claims("someone", json!(["developer"]));
    let now = now_secs();
    let cases: Vec<(&str, String)> = vec![
        (
            "wrong secret",
            sign_hs256(&good, b"another-secret-that-is-long-enough-for-hs256!!"),
        ),
        (
            "expired",
            sign_hs256(
                &with_claim(
                    with_claim(good.clone(), "exp", json!(now - 3600)),
                    "iat",
                    json!(now - 7200),
                ),
                TEST_SECRET.as_bytes(),
            ),
        ),
        (
            "not yet valid",
            sign_hs256(
                &with_claim(good.clone(), "nbf", json!(now + 600)),
                TEST_SECRET.as_bytes(),
            ),
        ),
        ("alg none", alg_none(&good)),
        ("alg HS512", sign_hs512(&good, TEST_SECRET.as_bytes())),
        (
            "header says none but signed",
            sign_with_header(&json!({"alg": "none"}), &good, TEST_SECRET.as_bytes()),
        ),
        (
            "wrong audience",
            sign_hs256(
                &with_claim(good.clone(), "aud", json!("other-api")),
                TEST_SECRET.as_bytes(),
            ),
        ),
        (
            "audience list without ours",
            sign_hs256(
                &with_claim(good.clone(), "aud", json!(["a", "b"])),
                TEST_SECRET.as_bytes(),
            ),
        ),
        (
            "wrong issuer",
            sign_hs256(
                &with_claim(good.clone(), "iss", json!("evil-idp")),
                TEST_SECRET.as_bytes(),
            ),
        ),
    ];
    for (what, tok) in cases {
        let auth = format!("Bearer {tok}");
        let resp = server.request("GET", "/api/runbooks", &[("Authorization", &auth)], None);
        assert_401(&resp, what);
    }
    // A tampered payload with the original signature.
    let tok = dev_token();
    let parts: Vec<&str> = tok.split('.').collect();
    let forged = b64url(&serde_json::to_vec(&claims("dev-tester", json!(["admin"]))).unwrap());
    let tampered = format!("Bearer {}.{}.{}", parts[0], forged, parts[2]);
    let resp = server.request(
        "GET",
        "/api/runbooks",
        &[("Authorization", &tampered)],
        None,
    );
    assert_401(&resp, "tampered payload");
}

#[test]
fn accepted_token_variants() {
    let server = Server::start(ServerOpts::new());
    let now = now_secs();
    let good = claims("someone", json!(["developer"]));
    let cases: Vec<(&str, String)> = vec![
        ("plain", sign_hs256(&good, TEST_SECRET.as_bytes())),
        (
            "audience list containing ours",
            sign_hs256(
                &with_claim(good.clone(), "aud", json!(["other", AUDIENCE])),
                TEST_SECRET.as_bytes(),
            ),
        ),
        (
            "expired within the 30 s leeway",
            sign_hs256(
                &with_claim(good.clone(), "exp", json!(now - 5)),
                TEST_SECRET.as_bytes(),
            ),
        ),
        (
            "nbf within the leeway",
            sign_hs256(
                &with_claim(good.clone(), "nbf", json!(now + 5)),
                TEST_SECRET.as_bytes(),
            ),
        ),
        (
            "roles as a comma string",
            sign_hs256(
                &with_claim(good.clone(), "roles", json!("developer, ops")),
                TEST_SECRET.as_bytes(),
            ),
        ),
    ];
    for (what, tok) in cases {
        let resp = server.get("/api/runbooks", Some(&tok));
        assert_eq!(resp.status, 200, "{what}: {}", resp.text());
        assert_eq!(resp.json()["success"], json!(true), "{what}");
    }
}

#[test]
fn dev_login_is_404_unless_enabled() {
    let server = Server::start(ServerOpts::new());
    let resp = server.request(
        "POST",
        "/dev-login",
        &[("Content-Type", "application/json")],
        Some(b"{}"),
    );
    assert_eq!(resp.status, 404, "body: {}", resp.text());
    assert_eq!(resp.json()["success"], json!(false));
}

#[test]
fn dev_login_issues_working_tokens() {
    let server = Server::start(ServerOpts::new().env("ENABLE_LOGIN", "true").runbook(
        "Admin.md",
        Runbook::new("Admin", "echo admin ok").claim("roles: admin"),
    ));
    // Defaults.
    let resp = server.request(
        "POST",
        "/dev-login",
        &[("Content-Type", "application/json")],
        Some(b"{}"),
    );
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    let body = resp.json();
    assert_eq!(body["token_type"], json!("bearer"), "{body}");
    assert_eq!(body["subject"], json!("dev-user-1"), "{body}");
    assert_eq!(body["roles"], json!(["developer"]), "{body}");
    let expires = chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("expires_at not RFC 3339: {e}: {body}"));
    let minutes = (expires.timestamp() - now_secs()) / 60;
    assert!(
        (470..=490).contains(&minutes),
        "default lifetime is 480 minutes, got {minutes}"
    );
    let tok = body["access_token"].as_str().unwrap().to_string();
    assert!(
        verify_hs256(&tok, TEST_SECRET.as_bytes()),
        "signed with JWT_SECRET"
    );
    let header = decode_segment(tok.split('.').next().unwrap());
    assert_eq!(header["alg"], json!("HS256"));
    let payload = decode_segment(tok.split('.').nth(1).unwrap());
    assert_eq!(payload["iss"], json!(ISSUER));
    assert_eq!(payload["sub"], json!("dev-user-1"));
    assert!(
        payload["iat"].is_number() && payload["exp"].is_number(),
        "{payload}"
    );
    let aud_ok = payload["aud"] == json!(AUDIENCE)
        || payload["aud"]
            .as_array()
            .is_some_and(|a| a.contains(&json!(AUDIENCE)));
    assert!(aud_ok, "aud: {payload}");
    let list = server.get("/api/runbooks", Some(&tok));
    assert_eq!(list.status, 200, "{}", list.text());
    // The developer token does not pass RBAC for the admin runbook.
    let resp = server.execute("Admin.md", &tok, json!({}));
    assert_eq!(resp.status, 403, "{}", resp.text());

    // Subject and roles from the body.
    let resp = server.request(
        "POST",
        "/dev-login",
        &[("Content-Type", "application/json")],
        Some(br#"{"subject": "alice", "roles": ["admin", "ops"]}"#),
    );
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    let body = resp.json();
    assert_eq!(body["subject"], json!("alice"));
    assert_eq!(body["roles"], json!(["admin", "ops"]));
    let tok = body["access_token"].as_str().unwrap();
    let payload = decode_segment(tok.split('.').nth(1).unwrap());
    assert_eq!(payload["sub"], json!("alice"));
    let resp = server.execute("Admin.md", tok, json!({}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["stdout"], json!("admin ok\n"));
    let cfg = server.get("/api/config", Some(tok));
    assert_eq!(cfg.status, 200, "{}", cfg.text());
    assert_eq!(cfg.json()["token"]["user_id"], json!("alice"));
}

#[test]
fn dev_login_without_secret_generates_one() {
    let server = Server::start(
        ServerOpts::new()
            .env("ENABLE_LOGIN", "true")
            .unset("JWT_SECRET"),
    );
    let resp = server.request(
        "POST",
        "/dev-login",
        &[("Content-Type", "application/json")],
        Some(br#"{"subject": "bob"}"#),
    );
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    let tok = resp.json()["access_token"].as_str().unwrap().to_string();
    assert_eq!(server.get("/api/runbooks", Some(&tok)).status, 200);
    assert!(!verify_hs256(&tok, TEST_SECRET.as_bytes()));
    // A token signed with a secret the server does not have is refused.
    assert_401(
        &server.get("/api/runbooks", Some(&dev_token())),
        "foreign secret",
    );
}

#[test]
fn rbac_refuses_missing_role_and_records_403() {
    let server = Server::start(ServerOpts::new().runbook(
        "Admin.md",
        Runbook::new("Admin", "echo admin only").claim("roles: admin"),
    ));
    let resp = server.json_request(
        "PATCH",
        "/api/runbooks/Admin.md/validate",
        &dev_token(),
        &json!({}),
    );
    assert_eq!(resp.status, 403, "validate: {}", resp.text());
    let resp = server.execute("Admin.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 403, "execute: {}", resp.text());
    let body = resp.json();
    assert_eq!(body["success"], json!(false));
    let err = body["error"].as_str().unwrap().to_lowercase();
    assert!(
        err.contains("rbac") || err.contains("claim"),
        "403 error should mention RBAC or claims: {err}"
    );
    let entries = server.history_entries("Admin.md");
    assert!(!entries.is_empty(), "a 403 history entry is appended");
    assert!(
        entries.iter().any(|e| entry_header(e).1 == 403),
        "an `Exit Code: 403` entry: {entries:?}"
    );
    assert!(
        entries.iter().all(|e| !e.contains("admin only")),
        "the script must not have run: {entries:?}"
    );
    // The SSE form is refused with JSON too.
    let auth = format!("Bearer {}", dev_token());
    let resp = server.request(
        "POST",
        "/api/runbooks/Admin.md/execute",
        &[
            ("Authorization", &auth),
            ("Accept", "text/event-stream"),
            ("Content-Type", "application/json"),
        ],
        Some(b"{}"),
    );
    assert_eq!(resp.status, 403);
    assert_eq!(resp.json()["success"], json!(false));
}

#[test]
fn rbac_accepts_matching_roles() {
    let server = Server::start(ServerOpts::new().runbook(
        "Admin.md",
        Runbook::new("Admin", "echo admin only").claim("roles: admin, superuser"),
    ));
    let tokens = vec![
        ("admin list", admin_token()),
        ("second allowed value", token("x", &["viewer", "superuser"])),
        (
            "comma string",
            sign_hs256(
                &claims("y", json!("developer, admin")),
                TEST_SECRET.as_bytes(),
            ),
        ),
    ];
    for (what, tok) in tokens {
        let resp = server.execute("Admin.md", &tok, json!({}));
        assert_eq!(resp.status, 200, "{what}: {}", resp.text());
        assert_eq!(resp.json()["stdout"], json!("admin only\n"), "{what}");
        let resp =
            server.json_request("PATCH", "/api/runbooks/Admin.md/validate", &tok, &json!({}));
        assert_eq!(resp.status, 200, "{what} validate: {}", resp.text());
    }
    // Reading is not subject to RBAC.
    let resp = server.get("/api/runbooks/Admin.md", Some(&dev_token()));
    assert_eq!(resp.status, 200);
}

#[test]
fn rbac_requires_every_claim() {
    let server = Server::start(
        ServerOpts::new().runbook(
            "Team.md",
            Runbook::new("Team", "echo team ok")
                .claim("roles: admin")
                .claim("team: blue, green"),
        ),
    );
    let only_role = token("a", &["admin"]);
    let resp = server.execute("Team.md", &only_role, json!({}));
    assert_eq!(resp.status, 403, "missing team claim: {}", resp.text());
    let mut c = claims("b", json!(["admin"]));
    c["team"] = json!("green");
    let both = sign_hs256(&c, TEST_SECRET.as_bytes());
    let resp = server.execute("Team.md", &both, json!({}));
    assert_eq!(resp.status, 200, "both claims: {}", resp.text());
    let mut c = claims("c", json!(["developer"]));
    c["team"] = json!(["blue"]);
    let wrong_role = sign_hs256(&c, TEST_SECRET.as_bytes());
    let resp = server.execute("Team.md", &wrong_role, json!({}));
    assert_eq!(resp.status, 403, "team but no role: {}", resp.text());
}
