//! Sub-runbooks called from a script through RUNBOOK_URL with curl. They need curl, so a plain
//! `cargo test` ignores them; CI runs them (and a missing curl fails them).

use std::time::Duration;

use serde_json::{json, Value};

use crate::util::*;

const CHILD: &str = r#"echo "child says: $GREETING"
echo "corr=$RUNBOOK_CORRELATION_ID"
echo "stack=$RUNBOOK_RECURSION_STACK"
"#;

const PARENT: &str = r#"echo "parent starts" >&2
curl -X POST "$RUNBOOK_URL/Child.md/execute" -H "$RUNBOOK_H_AUTH" -H "$RUNBOOK_H_CORR" -H "$RUNBOOK_H_RECUR" -H "$RUNBOOK_H_CTYPE" -d '{"env_vars":{"GREETING":"hello from parent"}}'
"#;

const PARENT_EVAL: &str = r#"eval "curl -s -X POST \"$RUNBOOK_URL/Child.md/execute\" $RUNBOOK_HEADERS -d '{\"env_vars\":{\"GREETING\":\"via eval\"}}'"
"#;

const PARENT_ADMIN: &str = r#"curl -s -X POST "$RUNBOOK_URL/AdminChild.md/execute" -H "$RUNBOOK_H_AUTH" -H "$RUNBOOK_H_CORR" -H "$RUNBOOK_H_RECUR" -H "$RUNBOOK_H_CTYPE" -d '{}'
"#;

const SELF_CALL: &str = r#"curl -s -X POST "$RUNBOOK_URL/Self.md/execute" -H "$RUNBOOK_H_AUTH" -H "$RUNBOOK_H_CORR" -H "$RUNBOOK_H_RECUR" -H "$RUNBOOK_H_CTYPE" -d '{}'
"#;

#[test]
#[ignore = "needs curl; CI runs it"]
fn parent_calls_child_through_runbook_url() {
    need_program("curl");
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Child.md",
                Runbook::new("Child", CHILD).env("GREETING", "what to say"),
            )
            .runbook("Parent.md", Runbook::new("Parent", PARENT))
            .runbook("ParentEval.md", Runbook::new("ParentEval", PARENT_EVAL)),
    );
    let resp = server.execute_with_headers(
        "Parent.md",
        &dev_token(),
        json!({}),
        &[("X-Correlation-Id", "corr-sub-1")],
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let parent = resp.json();
    let child = stdout_json(&parent);
    assert_eq!(child["success"], json!(true), "{child}");
    assert_eq!(child["return_code"], json!(0));
    let out = child["stdout"].as_str().unwrap();
    assert!(out.contains("child says: hello from parent\n"), "{out}");
    assert!(
        out.contains("corr=corr-sub-1\n"),
        "correlation id passed on: {out}"
    );
    let stack_line = out.lines().find_map(|l| l.strip_prefix("stack=")).unwrap();
    let stack: Vec<Value> = serde_json::from_str::<Value>(stack_line)
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(stack.len(), 2, "parent then child: {stack:?}");
    assert!(stack[0].as_str().unwrap().contains("Parent"), "{stack:?}");
    assert!(stack[1].as_str().unwrap().contains("Child"), "{stack:?}");
    assert_ne!(child["run_id"], parent["run_id"]);
    let entries = server.wait_for_history("Child.md", 1, Duration::from_secs(5));
    assert_eq!(entry_header(&entries[0]).1, 0);

    // The same through `eval` and RUNBOOK_HEADERS.
    let resp = server.execute("ParentEval.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let child = stdout_json(&resp.json());
    assert_eq!(child["return_code"], json!(0), "{child}");
    assert!(child["stdout"]
        .as_str()
        .unwrap()
        .contains("child says: via eval\n"));
}

#[test]
#[ignore = "needs curl; CI runs it"]
fn child_sees_the_callers_roles() {
    need_program("curl");
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "AdminChild.md",
                Runbook::new("AdminChild", "echo admin child ran").claim("roles: admin"),
            )
            .runbook("ParentAdmin.md", Runbook::new("ParentAdmin", PARENT_ADMIN)),
    );
    let body = server
        .execute("ParentAdmin.md", &admin_token(), json!({}))
        .json();
    let child = stdout_json(&body);
    assert_eq!(child["stdout"], json!("admin child ran\n"), "{child}");
    let body = server
        .execute("ParentAdmin.md", &dev_token(), json!({}))
        .json();
    let child = stdout_json(&body);
    assert_eq!(child["success"], json!(false), "{child}");
    assert!(!child.to_string().contains("admin child ran"));
}

#[test]
#[ignore = "needs curl; CI runs it"]
fn runbook_calling_itself_is_refused() {
    need_program("curl");
    let server =
        Server::start(ServerOpts::new().runbook("Self.md", Runbook::new("Self", SELF_CALL)));
    let resp = server.execute("Self.md", &dev_token(), json!({}));
    let outer = resp.json();
    assert_eq!(
        outer["return_code"],
        json!(0),
        "curl itself succeeded: {outer}"
    );
    let inner = stdout_json(&outer);
    assert_eq!(inner["return_code"], json!(1), "{inner}");
    assert_eq!(inner["success"], json!(false));
    assert!(
        inner["stderr"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("recurs"),
        "{inner}"
    );
    let entries = server.wait_for_history("Self.md", 2, Duration::from_secs(5));
    let mut codes: Vec<i64> = entries.iter().map(|e| entry_header(e).1).collect();
    codes.sort();
    assert_eq!(codes, vec![0, 1]);
}
