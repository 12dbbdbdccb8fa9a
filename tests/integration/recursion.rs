//! The X-Recursion-Stack header: a runbook already on the stack, and the depth limit, give a
//! failed run with a clear stderr; malformed stacks count as empty.

use std::time::Duration;

use serde_json::{json, Value};

use crate::util::*;

fn stack_of(body: &Value) -> Vec<Value> {
    let stdout = body["stdout"].as_str().unwrap();
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("stack="))
        .unwrap_or_else(|| panic!("no stack line: {body}"));
    serde_json::from_str::<Value>(line)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn run_with_stack(server: &Server, header: &str) -> (u16, Value) {
    let resp = server.execute_with_headers(
        "Loop.md",
        &dev_token(),
        json!({}),
        &[("X-Recursion-Stack", header)],
    );
    (resp.status, resp.json())
}

#[test]
fn recursion_stack_header_is_enforced() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Loop.md",
                Runbook::new(
                    "Loop",
                    "echo \"stack=$RUNBOOK_RECURSION_STACK\"\necho ran\n",
                ),
            )
            .env("MAX_RECURSION_DEPTH", "3"),
    );
    // Learn how this runbook appears on the stack.
    let body = server.execute("Loop.md", &dev_token(), json!({})).json();
    let stack = stack_of(&body);
    assert_eq!(stack.len(), 1, "{body}");
    let me = stack[0].as_str().unwrap().to_string();

    // Already on the stack: refused as a failed run.
    let header = json!(["Other.md", me]).to_string();
    let (status, body) = run_with_stack(&server, &header);
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["return_code"], json!(1), "{body}");
    assert!(
        !body["stdout"].as_str().unwrap_or("").contains("ran"),
        "{body}"
    );
    let stderr = body["stderr"].as_str().unwrap().to_lowercase();
    assert!(
        stderr.contains("recurs"),
        "clear stderr message: {stderr:?}"
    );

    // Too deep: a stack of MAX_RECURSION_DEPTH entries.
    let (status, body) = run_with_stack(&server, &json!(["a", "b", "c"]).to_string());
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["return_code"], json!(1));
    let stderr = body["stderr"].as_str().unwrap().to_lowercase();
    assert!(
        stderr.contains("depth") || stderr.contains("recurs"),
        "{stderr:?}"
    );

    // One below the limit runs, and the stack grows by this runbook.
    let (status, body) = run_with_stack(&server, &json!(["a", "b"]).to_string());
    assert_eq!(status, 200, "{body}");
    assert_eq!(stack_of(&body), vec![json!("a"), json!("b"), json!(me)]);

    // Anything that is not a JSON list of strings counts as empty.
    for bad in ["not json", "{\"a\": 1}", "[\"a\", 3]", "\"Loop.md\""] {
        let (status, body) = run_with_stack(&server, bad);
        assert_eq!(status, 200, "{bad}: {body}");
        assert_eq!(stack_of(&body), vec![json!(me)], "{bad}");
    }

    // Refusals are recorded in history.
    let entries = server.history_entries("Loop.md");
    assert!(
        entries.iter().filter(|e| entry_header(e).1 == 1).count() >= 2,
        "{entries:?}"
    );
}

#[test]
fn recursion_refusal_over_sse() {
    let server = Server::start(ServerOpts::new().runbook(
        "Loop.md",
        Runbook::new(
            "Loop",
            "echo \"stack=$RUNBOOK_RECURSION_STACK\"\necho ran\n",
        ),
    ));
    let body = server.execute("Loop.md", &dev_token(), json!({})).json();
    let me = stack_of(&body)[0].clone();
    let auth = format!("Bearer {}", dev_token());
    let header = json!([me]).to_string();
    let resp = open(
        server.port,
        "HTTP/1.1",
        "POST",
        "/api/runbooks/Loop.md/execute",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
            ("X-Recursion-Stack", &header),
        ],
        Some(b"{}"),
    );
    assert_eq!(resp.status, 200);
    let mut sse = SseStream::new(resp);
    let events = sse.until_done(Duration::from_secs(20));
    assert!(
        joined(&events, "stderr").to_lowercase().contains("recurs"),
        "{events:?}"
    );
    assert!(!joined(&events, "stdout").contains("ran"));
    assert_eq!(done_json(&events)["return_code"], json!(1));
}
