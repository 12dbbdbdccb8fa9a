//! Synchronous execute: the JSON answer, env_vars handling, the script's environment (secrets
//! removed, system variables, masked run token), interpreters, inputs and negotiation.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::*;

fn kv_lines(stdout: &str) -> HashMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn assert_run_id(run_id: &Value, prefix: &str) -> String {
    let id = run_id
        .as_str()
        .unwrap_or_else(|| panic!("run_id is not a string: {run_id}"));
    let uuid = id
        .strip_prefix(&format!("{prefix}-"))
        .unwrap_or_else(|| panic!("run_id {id:?} should start with {prefix}-"));
    assert!(
        uuid::Uuid::parse_str(uuid).is_ok(),
        "run_id {id:?} should end in a uuid"
    );
    id.to_string()
}

#[test]
fn sync_success_answer() {
    let server = Server::start(ServerOpts::new().runbook(
        "Hello.md",
        Runbook::new("Hello", "echo hello\necho oops >&2\n"),
    ));
    let resp = server.execute("Hello.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resp
        .header("Content-Type")
        .is_some_and(|c| c.contains("application/json")));
    let body = resp.json();
    assert_eq!(body["success"], json!(true), "{body}");
    assert!(
        body["runbook"] == json!("Hello.md") || body["runbook"] == json!("Hello"),
        "{body}"
    );
    assert_run_id(&body["run_id"], "r1");
    assert_eq!(body["return_code"], json!(0));
    assert_eq!(body["stdout"], json!("hello\n"));
    assert_eq!(body["stderr"], json!("oops\n"));
    assert_eq!(body["errors"], json!([]));
    assert!(body["warnings"].is_array(), "{body}");
    assert_eq!(body["truncated"], json!({"stdout": false, "stderr": false}));
    let entries = server.wait_for_history("Hello.md", 1, Duration::from_secs(5));
    assert_eq!(entries.len(), 1);
    let (_, code, run) = entry_header(&entries[0]);
    assert_eq!(code, 0);
    assert_eq!(run.as_deref(), body["run_id"].as_str());
}

#[test]
fn sync_failure_is_500_with_error() {
    let server = Server::start(ServerOpts::new().runbook(
        "Fail.md",
        Runbook::new("Fail", "echo partial\necho bad >&2\nexit 3\n"),
    ));
    let resp = server.execute("Fail.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 500, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["success"], json!(false));
    assert_eq!(body["return_code"], json!(3));
    assert_eq!(body["stdout"], json!("partial\n"));
    assert_eq!(body["stderr"], json!("bad\n"));
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "a failed run carries an error string: {body}"
    );
    assert!(body["run_id"].is_string());
}

#[test]
fn instance_id_prefixes_run_ids() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Hello.md",
                Runbook::new("Hello", "echo \"$RUNBOOK_RUN_ID\""),
            )
            .env("INSTANCE_ID", "node7"),
    );
    let body = server.execute("Hello.md", &dev_token(), json!({})).json();
    let id = assert_run_id(&body["run_id"], "node7");
    assert_eq!(body["stdout"], json!(format!("{id}\n")));
}

#[test]
fn env_vars_are_passed_and_converted() {
    let script = "printf '%s|%s|%s|%s|%s|%s\\n' \"$S\" \"$N\" \"$F\" \"$B\" \"$B2\" \"$NEG\"\nprintf '%s\\n' \"$CTRL\"\n[ \"$CRV\" = \"$(printf 'x\\ry')\" ] && echo cr-kept\n";
    let mut book = Runbook::new("Vars", script);
    for name in ["S", "N", "F", "B", "B2", "NEG", "CTRL", "CRV"] {
        book = book.env(name, "a value");
    }
    let server = Server::start(ServerOpts::new().runbook("Vars.md", book));
    let resp = server.execute(
        "Vars.md",
        &dev_token(),
        json!({
            "S": "a string with spaces",
            "N": 42,
            "F": 1.5,
            "B": true,
            "B2": false,
            "NEG": -7,
            "CTRL": "a\u{1}b\tc\nd\u{1b}e",
            "CRV": "x\ry",
        }),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    assert_eq!(
        body["stdout"],
        json!("a string with spaces|42|1.5|true|false|-7\nab\tc\nde\ncr-kept\n"),
        "control characters other than tab/LF/CR are removed: {body}"
    );
}

#[test]
fn bad_env_vars_are_400_and_run_nothing() {
    let server =
        Server::start(ServerOpts::new().runbook("Vars.md", Runbook::new("Vars", "echo ran")));
    let bad: Vec<(&str, Value)> = vec![
        ("object value", json!({"X": {"a": 1}})),
        ("array value", json!({"X": [1, 2]})),
        ("null value", json!({"X": null})),
        ("name starting with a digit", json!({"1X": "v"})),
        ("name with a dash", json!({"A-B": "v"})),
        ("name with a space", json!({"A B": "v"})),
        ("empty name", json!({"": "v"})),
        ("LD_PRELOAD", json!({"LD_PRELOAD": "/tmp/x.so"})),
        ("LD_LIBRARY_PATH", json!({"LD_LIBRARY_PATH": "/tmp"})),
        ("env_vars not an object", json!(["X=1"])),
    ];
    for (what, env_vars) in bad {
        let resp = server.execute("Vars.md", &dev_token(), env_vars);
        assert_eq!(resp.status, 400, "{what}: {}", resp.text());
        let body = resp.json();
        assert_eq!(body["success"], json!(false), "{what}");
        assert!(body["error"].is_string(), "{what}: {body}");
    }
    assert!(
        server.history_entries("Vars.md").is_empty(),
        "a 400 creates no run: {}",
        server.read_runbook("Vars.md")
    );
}

#[test]
fn system_variables_cannot_be_set_by_the_request() {
    let server = Server::start(
        ServerOpts::new().runbook(
            "Sys.md",
            Runbook::new(
                "Sys",
                "echo \"RUN=$RUNBOOK_RUN_ID\"\necho \"URL=$RUNBOOK_URL\"\necho \"OK=$OK\"\n",
            )
            .env("OK", "passed through"),
        ),
    );
    let resp = server.execute(
        "Sys.md",
        &dev_token(),
        json!({"RUNBOOK_RUN_ID": "forged-id", "RUNBOOK_URL": "http://evil/", "OK": "yes"}),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    let out = kv_lines(body["stdout"].as_str().unwrap());
    assert_eq!(out["RUN"], body["run_id"].as_str().unwrap());
    assert_eq!(
        out["URL"],
        format!("http://localhost:{}/api/runbooks", server.port)
    );
    assert_eq!(out["OK"], "yes");
    let warnings = body["warnings"].to_string();
    assert!(
        warnings.contains("RUNBOOK_RUN_ID"),
        "dropping a system variable gives a warning naming it: {body}"
    );
}

#[test]
fn missing_required_env_fails_the_run_with_code_1() {
    let server = Server::start(ServerOpts::new().runbook(
        "Needs.md",
        Runbook::new("Needs", "echo should-not-run").env("REQUIRED_X", "needed"),
    ));
    let resp = server.execute("Needs.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 500, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["return_code"], json!(1), "{body}");
    assert_eq!(body["success"], json!(false));
    assert!(
        body["stderr"].as_str().unwrap().contains("REQUIRED_X"),
        "stderr lists the missing variable: {body}"
    );
    assert!(!body["stdout"]
        .as_str()
        .unwrap_or("")
        .contains("should-not-run"));
    let entries = server.wait_for_history("Needs.md", 1, Duration::from_secs(5));
    assert_eq!(entry_header(&entries[0]).1, 1);
    // With the variable it runs.
    let resp = server.execute("Needs.md", &dev_token(), json!({"REQUIRED_X": "v"}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["stdout"], json!("should-not-run\n"));
}

#[test]
fn missing_input_file_fails_the_run_with_code_1() {
    let server = Server::start(ServerOpts::new().runbook(
        "NeedsFile.md",
        Runbook::new("NeedsFile", "echo should-not-run").input("./absent-input.txt"),
    ));
    let resp = server.execute("NeedsFile.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 500, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["return_code"], json!(1), "{body}");
    assert!(
        body["stderr"]
            .as_str()
            .unwrap()
            .contains("absent-input.txt"),
        "{body}"
    );
    assert!(!body["stdout"]
        .as_str()
        .unwrap_or("")
        .contains("should-not-run"));
}

#[test]
fn secrets_never_reach_the_script() {
    let server = Server::start(
        ServerOpts::new()
            .runbook("Env.md", Runbook::new("Env", "env"))
            .env("VISIBLE_VAR", "shown-value")
            .env("MY_API_KEY", "supersecretvalue-xyz")
            .env("SECRET_ENV_VARS", "MY_API_KEY")
            .env("NOTIFY_SOCKET", "/nonexistent/notify.sock"),
    );
    let resp = server.execute("Env.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let stdout = resp.json()["stdout"].as_str().unwrap().to_string();
    assert!(
        stdout.contains("VISIBLE_VAR=shown-value"),
        "server env is inherited: {stdout}"
    );
    assert!(!stdout.contains(TEST_SECRET), "JWT_SECRET value leaked");
    assert!(!stdout.contains("JWT_SECRET="), "JWT_SECRET name leaked");
    assert!(
        !stdout.contains("supersecretvalue-xyz"),
        "SECRET_ENV_VARS not honoured"
    );
    assert!(!stdout.contains("NOTIFY_SOCKET="), "NOTIFY_SOCKET leaked");
    assert!(!server.read_runbook("Env.md").contains(TEST_SECRET));
}

#[test]
fn run_token_is_masked_and_carries_the_run() {
    let script = "echo \"token=$RUNBOOK_API_TOKEN\"\n\
                  echo \"$RUNBOOK_H_AUTH\"\n\
                  echo \"payload=$(printf '%s' \"$RUNBOOK_API_TOKEN\" | cut -d. -f2)\"\n\
                  echo \"token-on-stderr=$RUNBOOK_API_TOKEN\" >&2\n";
    let server = Server::start(ServerOpts::new().runbook("Tok.md", Runbook::new("Tok", script)));
    let started = now_secs();
    let resp = server.execute("Tok.md", &token("carol", &["developer", "ops"]), json!({}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    let stdout = body["stdout"].as_str().unwrap();
    let out = kv_lines(stdout);
    assert_eq!(out["token"], "***", "{stdout}");
    assert!(stdout.contains("Authorization: Bearer ***\n"), "{stdout}");
    assert_eq!(body["stderr"], json!("token-on-stderr=***\n"));
    let payload = decode_segment(&out["payload"]);
    assert_eq!(payload["sub"], json!("carol"), "{payload}");
    assert_eq!(payload["run_id"], body["run_id"], "{payload}");
    let roles = payload["roles"].to_string();
    assert!(
        roles.contains("developer") && roles.contains("ops"),
        "{payload}"
    );
    let exp = payload["exp"].as_i64().unwrap();
    assert!(
        (started + 500..=started + 700).contains(&exp),
        "exp at the run's deadline (SCRIPT_TIMEOUT_SECONDS=600): {exp} vs now {started}"
    );
    let entries = server.wait_for_history("Tok.md", 1, Duration::from_secs(5));
    assert!(
        entries[0].contains("token=***"),
        "history is masked: {}",
        entries[0]
    );
    assert!(entries[0].contains("token-on-stderr=***"), "{}", entries[0]);
}

#[test]
fn system_variables_are_set() {
    let script = r#"echo "URL=$RUNBOOK_URL"
echo "RUN=$RUNBOOK_RUN_ID"
echo "CORR=$RUNBOOK_CORRELATION_ID"
echo "STACK=$RUNBOOK_RECURSION_STACK"
echo "HCORR=$RUNBOOK_H_CORR"
echo "HRECUR=$RUNBOOK_H_RECUR"
echo "HCTYPE=$RUNBOOK_H_CTYPE"
echo "HAUTH=$RUNBOOK_H_AUTH"
echo "EXEC=$RUNBOOK_EXEC_DIR_HOST"
echo "PWD=$(pwd)"
echo "HEADERS=$RUNBOOK_HEADERS"
eval "set -- $RUNBOOK_HEADERS"
echo "HEADER_ARGS=$#"
n=0
for a in "$@"; do n=$((n+1)); echo "ARG$n=$a"; done
"#;
    let server =
        Server::start(ServerOpts::new().runbook("SysVars.md", Runbook::new("SysVars", script)));
    let resp = server.execute_with_headers(
        "SysVars.md",
        &dev_token(),
        json!({}),
        &[("X-Correlation-Id", "corr-abc-123")],
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    let out = kv_lines(body["stdout"].as_str().unwrap());
    assert_eq!(
        out["URL"],
        format!("http://localhost:{}/api/runbooks", server.port)
    );
    assert_eq!(out["RUN"], body["run_id"].as_str().unwrap());
    assert_eq!(out["CORR"], "corr-abc-123");
    let stack: Value = serde_json::from_str(&out["STACK"]).unwrap();
    let stack = stack
        .as_array()
        .expect("recursion stack is a JSON list")
        .clone();
    assert_eq!(stack.len(), 1, "{stack:?}");
    assert!(stack[0].as_str().unwrap().contains("SysVars"), "{stack:?}");
    assert_eq!(out["HCORR"], "X-Correlation-Id: corr-abc-123");
    let recur = out["HRECUR"]
        .strip_prefix("X-Recursion-Stack: ")
        .unwrap_or_else(|| panic!("HRECUR {:?}", out["HRECUR"]));
    assert_eq!(serde_json::from_str::<Value>(recur).unwrap(), json!(stack));
    assert_eq!(out["HCTYPE"], "Content-Type: application/json");
    assert_eq!(out["HAUTH"], "Authorization: Bearer ***");
    let exec_dir = server.exec_dir().canonicalize().unwrap();
    assert!(
        std::path::Path::new(&out["PWD"]).starts_with(&exec_dir),
        "working dir {:?} under EXECUTION_DIR {exec_dir:?}",
        out["PWD"]
    );
    assert_eq!(out["EXEC"], out["PWD"]);
    // RUNBOOK_HEADERS is four `-H <header>` word pairs once evaluated by the shell.
    let headers = &out["HEADERS"];
    assert_eq!(headers.matches("-H ").count(), 4, "{headers}");
    assert_eq!(out["HEADER_ARGS"], "8", "{headers}");
    let mut evaluated = Vec::new();
    for n in (1..=8).step_by(2) {
        assert_eq!(out[&format!("ARG{n}")], "-H", "{headers}");
        evaluated.push(out[&format!("ARG{}", n + 1)].clone());
    }
    evaluated.sort();
    let mut wanted = vec![
        out["HAUTH"].clone(),
        out["HCORR"].clone(),
        out["HRECUR"].clone(),
        out["HCTYPE"].clone(),
    ];
    wanted.sort();
    assert_eq!(evaluated, wanted, "{headers}");
    assert!(
        wait_until(Duration::from_secs(5), || !std::path::Path::new(
            &out["PWD"]
        )
        .exists()),
        "the run's working directory is removed afterwards"
    );
    // Without X-Correlation-Id a new one is made.
    let body = server.execute("SysVars.md", &dev_token(), json!({})).json();
    let out = kv_lines(body["stdout"].as_str().unwrap());
    assert!(!out["CORR"].is_empty());
    assert_ne!(out["CORR"], "corr-abc-123");
}

#[test]
fn api_host_and_protocol_build_runbook_url() {
    let server = Server::start(
        ServerOpts::new()
            .runbook("Url.md", Runbook::new("Url", "echo \"$RUNBOOK_URL\""))
            .env("API_PROTOCOL", "https")
            .env("API_HOST", "runbooks.example"),
    );
    let body = server.execute("Url.md", &dev_token(), json!({})).json();
    assert_eq!(
        body["stdout"],
        json!(format!(
            "https://runbooks.example:{}/api/runbooks\n",
            server.port
        ))
    );
}

#[test]
fn input_files_and_folders_are_copied() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Inputs.md",
                Runbook::new(
                    "Inputs",
                    "cat data.txt\ncat CreatePackage/inner.txt\necho changed > data.txt\n",
                )
                .input("./data.txt")
                .input("./CreatePackage"),
            )
            .file("data.txt", b"file content\n")
            .file("CreatePackage/inner.txt", b"inner content\n"),
    );
    let resp = server.execute("Inputs.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.json()["stdout"],
        json!("file content\ninner content\n")
    );
    // The copy was changed, not the original.
    assert_eq!(
        std::fs::read_to_string(server.runbooks_dir().join("data.txt")).unwrap(),
        "file content\n"
    );
}

#[test]
fn interpreter_line_is_honoured() {
    let dash_or_sh = std::fs::canonicalize("/bin/sh").unwrap();
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Errexit.md",
                Runbook::new("Errexit", "#!/bin/sh -e\nfalse\necho notreached\n"),
            )
            .runbook(
                "Spaced.md",
                Runbook::new("Spaced", "#!   /bin/sh\necho spaced\n"),
            )
            .runbook("Plain.md", Runbook::new("Plain", "readlink /proc/$$/exe\n"))
            .runbook(
                "Stdin.md",
                Runbook::new(
                    "Stdin",
                    "cat\nif read line; then echo got-input; fi\necho done-reading\n",
                ),
            ),
    );
    let body = server.execute("Errexit.md", &dev_token(), json!({})).json();
    assert_eq!(
        body["return_code"],
        json!(1),
        "`-e` argument passed: {body}"
    );
    assert!(!body["stdout"].as_str().unwrap().contains("notreached"));

    let body = server.execute("Spaced.md", &dev_token(), json!({})).json();
    assert_eq!(body["stdout"], json!("spaced\n"), "{body}");

    let body = server.execute("Plain.md", &dev_token(), json!({})).json();
    assert_eq!(
        body["stdout"],
        json!(format!("{}\n", dash_or_sh.display())),
        "no #! line runs /bin/sh: {body}"
    );

    let start = Instant::now();
    let body = server.execute("Stdin.md", &dev_token(), json!({})).json();
    assert_eq!(
        body["stdout"],
        json!("done-reading\n"),
        "stdin is /dev/null: {body}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn accept_header_and_stream_parameter_negotiate() {
    let server = Server::start(ServerOpts::new().runbook("Hi.md", Runbook::new("Hi", "echo hi")));
    let auth = format!("Bearer {}", dev_token());
    let post = |path: &str, accept: Option<&str>| {
        let mut headers = vec![
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ];
        if let Some(a) = accept {
            headers.push(("Accept", a));
        }
        server.request("POST", path, &headers, Some(b"{}"))
    };
    let is_sse = |r: &Response| {
        r.header("Content-Type")
            .is_some_and(|c| c.starts_with("text/event-stream"))
    };
    for accept in [None, Some("application/json"), Some("*/*")] {
        let resp = post("/api/runbooks/Hi.md/execute", accept);
        assert_eq!(resp.status, 200);
        assert!(!is_sse(&resp), "Accept {accept:?} gives JSON");
        assert_eq!(resp.json()["stdout"], json!("hi\n"));
    }
    for (path, accept) in [
        (
            "/api/runbooks/Hi.md/execute",
            Some("text/html, text/event-stream;q=0.9"),
        ),
        ("/api/runbooks/Hi.md/execute", Some("text/event-stream")),
        ("/api/runbooks/Hi.md/execute?stream=true", None),
        (
            "/api/runbooks/Hi.md/execute?stream=true",
            Some("application/json"),
        ),
    ] {
        let resp = post(path, accept);
        assert_eq!(resp.status, 200);
        assert!(
            is_sse(&resp),
            "{path} with Accept {accept:?} streams: {:?}",
            resp.headers
        );
        let mut parser = SseParser::new();
        let events = parser.feed(&resp.body, Instant::now());
        assert_eq!(joined(&events, "stdout"), "hi\n");
        assert_eq!(done_json(&events)["return_code"], json!(0));
    }
}
