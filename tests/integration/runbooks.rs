//! Reading runbooks: list, get one, traversal attempts, required-env and validate.

use serde_json::{json, Value};

use crate::runs_support::RunsApi;
use crate::util::*;

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn list_is_sorted_and_skips_non_runbooks() {
    let server = Server::start(
        ServerOpts::new()
            .runbook("b.md", Runbook::new("Beta", "echo b"))
            .runbook("a.md", Runbook::new("Alpha", "echo a"))
            .runbook("c.md", Runbook::new("Gamma", "echo c"))
            .file("no-heading.md", b"Just text\n# Late Heading\n")
            .file("sub-heading.md", b"## Not an H1\n")
            .file("notes.txt", b"# Looks Like A Runbook\n")
            .file("empty.md", b""),
    );
    let resp = server.get("/api/runbooks", Some(&dev_token()));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["success"], json!(true));
    let list = body["runbooks"].as_array().unwrap();
    let filenames: Vec<&str> = list
        .iter()
        .map(|r| r["filename"].as_str().unwrap())
        .collect();
    assert_eq!(
        filenames,
        vec!["a.md", "b.md", "c.md"],
        "sorted by filename: {body}"
    );
    assert_eq!(names(&body["runbooks"]), vec!["Alpha", "Beta", "Gamma"]);
    for r in list {
        assert_eq!(
            r["path"], r["filename"],
            "path is relative to RUNBOOKS_DIR: {r}"
        );
    }
}

#[test]
fn get_one_runbook() {
    let rb = Runbook::new("Alpha", "echo a\n").env("GREETING", "what to say");
    let server = Server::start(ServerOpts::new().runbook("Alpha.md", rb.clone()));
    let resp = server.get("/api/runbooks/Alpha.md", Some(&dev_token()));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["success"], json!(true));
    assert_eq!(body["filename"], json!("Alpha.md"));
    assert_eq!(body["name"], json!("Alpha"));
    assert_eq!(body["content"], json!(rb.render()));
    // Needs a token.
    assert_eq!(server.get("/api/runbooks/Alpha.md", None).status, 401);
}

#[test]
fn missing_runbook_is_404_not_found() {
    let server = Server::start(ServerOpts::new());
    for path in [
        "/api/runbooks/Nope.md",
        "/api/runbooks/Nope.md/required-env",
    ] {
        let resp = server.get(path, Some(&dev_token()));
        assert_eq!(resp.status, 404, "{path}: {}", resp.text());
        let body = resp.json();
        assert_eq!(body["success"], json!(false));
        // Names what was asked for (no runbook is near it: no suggestion).
        assert_eq!(
            body["error"],
            json!("runbook Nope.md not found"),
            "{path}: {body}"
        );
    }
}

#[test]
fn traversal_attempts_never_leave_the_directory() {
    let secret_md = "# Secret\nTOPSECRET-CONTENT\n";
    let marker = "pwned-marker";
    let server = Server::start(
        ServerOpts::new()
            .runbook("Inside.md", Runbook::new("Inside", "echo inside"))
            .file("notes.txt", b"# Notes\nTXT-CONTENT\n")
            .file("sub/Nested.md", b"# Nested\nNESTED-CONTENT\n")
            .outside_file("x.md", secret_md.as_bytes())
            .outside_file("outside/secret.md", secret_md.as_bytes())
            .symlink("link.md", "outside/secret.md"),
    );
    // A runbook outside RUNBOOKS_DIR whose script would leave a marker if it ever ran.
    let marker_path = server.root.join(marker);
    let evil = Runbook::new("Evil", &format!("echo ran > '{}'", marker_path.display()));
    std::fs::write(server.root.join("evil.md"), evil.render()).unwrap();

    let tok = dev_token();
    let names = [
        "..%2Fx.md",
        "%2e%2e%2fx.md",
        "%2E%2E%2Fx.md",
        "..%2f..%2f..%2fetc%2fpasswd",
        "..%5Cx.md",
        "x.md%00",
        "Inside.md%00.md",
        "Inside.md%00",
        "notes.txt",
        "link.md",
        "sub%2FNested.md",
        "..",
        "%2e%2e",
        "..%2Fevil.md",
    ];
    for name in names {
        for suffix in ["", "/required-env"] {
            let path = format!("/api/runbooks/{name}{suffix}");
            let resp = server.get(&path, Some(&tok));
            assert!(
                resp.status == 400 || resp.status == 404,
                "{path}: expected 400 or 404, got {} {}",
                resp.status,
                resp.text()
            );
            let text = resp.text();
            assert!(
                !text.contains("TOPSECRET")
                    && !text.contains("TXT-CONTENT")
                    && !text.contains("root:"),
                "{path} leaked content: {text}"
            );
        }
        let exec = server.execute(name, &tok, json!({}));
        assert!(
            exec.status == 400 || exec.status == 404,
            "execute {name}: got {} {}",
            exec.status,
            exec.text()
        );
        let val = server.json_request(
            "PATCH",
            &format!("/api/runbooks/{name}/validate"),
            &tok,
            &json!({}),
        );
        assert!(
            val.status == 400 || val.status == 404,
            "validate {name}: got {} {}",
            val.status,
            val.text()
        );
        assert!(!val.text().contains("TOPSECRET"));
    }
    // Literal (unencoded) dot segments sent as-is on the request line.
    for path in [
        "/api/runbooks/../x.md",
        "/api/runbooks/../../x.md",
        "/api/runbooks/./../x.md",
        "/api/runbooks/../evil.md/execute",
    ] {
        let method = if path.ends_with("execute") {
            "POST"
        } else {
            "GET"
        };
        let auth = format!("Bearer {tok}");
        let resp = server.request(
            method,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            if method == "POST" { Some(b"{}") } else { None },
        );
        assert!(
            resp.status == 400 || resp.status == 404,
            "{path}: expected 400 or 404, got {} {}",
            resp.status,
            resp.text()
        );
        assert!(!resp.text().contains("TOPSECRET"), "{path} leaked");
    }
    // Every request above was answered, and a sync execute answers after its run has ended,
    // every run being registered before its script starts: no run on record means none ran.
    assert!(
        server.list_runs("", &tok).is_empty(),
        "a runbook outside RUNBOOKS_DIR was started"
    );
    assert!(
        !marker_path.exists(),
        "a runbook outside RUNBOOKS_DIR was executed"
    );
    // Nothing was appended to files outside.
    assert_eq!(
        std::fs::read_to_string(server.root.join("x.md")).unwrap(),
        secret_md
    );
    assert_eq!(
        std::fs::read_to_string(server.root.join("outside/secret.md")).unwrap(),
        secret_md
    );
    // The legitimate runbook is still served.
    assert_eq!(
        server.get("/api/runbooks/Inside.md", Some(&tok)).status,
        200
    );
}

#[test]
fn required_env_lists_available_and_missing() {
    let rb = Runbook::new("NeedsEnv", "echo hi")
        .env("AVAILABLE_VAR", "set in the server environment")
        .env("EMPTY_VAR", "set but empty")
        .env("MISSING_VAR", "not set anywhere");
    let server = Server::start(
        ServerOpts::new()
            .runbook("NeedsEnv.md", rb)
            .env("AVAILABLE_VAR", "yes")
            .env("EMPTY_VAR", ""),
    );
    let resp = server.get("/api/runbooks/NeedsEnv.md/required-env", Some(&dev_token()));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["success"], json!(true));
    assert_eq!(body["filename"], json!("NeedsEnv.md"));
    let mut required = names(&body["required"]);
    required.sort();
    assert_eq!(
        required,
        vec!["AVAILABLE_VAR", "EMPTY_VAR", "MISSING_VAR"],
        "{body}"
    );
    assert_eq!(names(&body["available"]), vec!["AVAILABLE_VAR"], "{body}");
    let mut missing = names(&body["missing"]);
    missing.sort();
    assert_eq!(missing, vec!["EMPTY_VAR", "MISSING_VAR"], "{body}");
    let described = body["required"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == json!("MISSING_VAR"))
        .unwrap();
    assert_eq!(described["description"], json!("not set anywhere"));
}

fn validate(server: &Server, file: &str, env_vars: Value) -> (u16, Value) {
    let resp = server.validate(file, &dev_token(), env_vars);
    let status = resp.status;
    (status, resp.json())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| {
            s.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| s.to_string())
        })
        .collect()
}

#[test]
fn validate_reports_errors_and_warnings() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Valid.md",
                Runbook::new("Valid", "cat data.txt")
                    .env("VAR_A", "needed")
                    .input("./data.txt"),
            )
            .file("data.txt", b"data\n")
            .runbook(
                "MissingInput.md",
                Runbook::new("MissingInput", "echo x").input("./absent-file.txt"),
            )
            .runbook(
                "OutsideInput.md",
                Runbook::new("OutsideInput", "echo x").input("../outside.txt"),
            )
            .outside_file("outside.txt", b"outside\n")
            .runbook("mismatch.md", Runbook::new("Something Else", "echo x"))
            .runbook(
                "NoHistory.md",
                Runbook::new("NoHistory", "echo x").without_history(),
            ),
    );
    let (status, body) = validate(&server, "Valid.md", json!({"VAR_A": "x"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], json!(true), "{body}");
    assert!(strings(&body["errors"]).is_empty(), "{body}");
    assert!(strings(&body["warnings"]).is_empty(), "{body}");
    assert!(body["runbook"].is_string(), "{body}");

    let (status, body) = validate(&server, "Valid.md", json!({}));
    assert_eq!(status, 400, "missing VAR_A: {body}");
    assert_eq!(body["success"], json!(false));
    assert!(
        body["error"].is_string(),
        "400 result carries an error string: {body}"
    );
    assert!(
        strings(&body["errors"]).iter().any(|e| e.contains("VAR_A")),
        "{body}"
    );
    let (status, body) = validate(&server, "Valid.md", json!({"VAR_A": ""}));
    assert_eq!(status, 400, "empty VAR_A: {body}");

    let (status, body) = validate(&server, "MissingInput.md", json!({}));
    assert_eq!(status, 400, "{body}");
    assert!(
        strings(&body["errors"])
            .iter()
            .any(|e| e.contains("absent-file.txt")),
        "{body}"
    );
    let (status, body) = validate(&server, "OutsideInput.md", json!({}));
    assert_eq!(status, 400, "input outside the runbook directory: {body}");

    let (status, body) = validate(&server, "mismatch.md", json!({}));
    assert_eq!(status, 200, "{body}");
    assert!(
        !strings(&body["warnings"]).is_empty(),
        "name mismatch warning: {body}"
    );

    let (status, body) = validate(&server, "NoHistory.md", json!({}));
    assert_eq!(status, 400, "missing History section: {body}");
    assert!(
        strings(&body["errors"])
            .iter()
            .any(|e| e.contains("History")),
        "{body}"
    );
    // Validation appends nothing.
    assert!(server.history_entries("Valid.md").is_empty());
}

#[test]
fn validate_uses_the_server_environment() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Env.md",
                Runbook::new("Env", "echo x").env("FROM_SERVER", "d"),
            )
            .env("FROM_SERVER", "present"),
    );
    let (status, body) = validate(&server, "Env.md", json!({}));
    assert_eq!(status, 200, "{body}");
}
