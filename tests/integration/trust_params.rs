//! The trust boundary of parameters and of who may see and stop what: undeclared request
//! variables never reach a script (named in a warning), runbooks cannot declare variables that
//! change how an interpreter starts, value sizes are bounded before any run exists, History
//! output is hidden from readers without the Required Claims, cancelling is for the owner and
//! administrators, and refusals neither come from validate nor push runs out of History.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::runs_support::*;
use crate::util::*;

/// A bash script reporting what of the injection attempts reached it.
const PROBE: &str = r#"#!/bin/bash
echo "BASH_ENV=${BASH_ENV-unset}"
echo "ENV=${ENV-unset}"
echo "NODE_OPTIONS=${NODE_OPTIONS-unset}"
echo "PERL5OPT=${PERL5OPT-unset}"
echo "SHELLOPTS=$SHELLOPTS"
case "$PS4" in *touch*) echo "PS4=injected" ;; *) echo "PS4=default" ;; esac
echo "PATH=$PATH"
cat /dev/null
echo "DECLARED=$DECLARED"
"#;

/// Whether any of the marker files the injections would create exists.
fn markers_in(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("marker-"))
        .collect()
}

/// A directory holding a fake `cat` that leaves a marker, and the injected variables.
fn injections(root: &Path) -> Value {
    let fake_bin = root.join("fake-bin");
    fs::create_dir_all(&fake_bin).unwrap();
    let cat = fake_bin.join("cat");
    fs::write(
        &cat,
        format!("#!/bin/sh\ntouch '{}/marker-path'\n", root.display()),
    )
    .unwrap();
    fs::set_permissions(&cat, fs::Permissions::from_mode(0o755)).unwrap();
    let m = |name: &str| format!("{}/marker-{name}", root.display());
    json!({
        "BASH_ENV": format!("$(touch {})", m("bash-env")),
        "SHELLOPTS": "xtrace",
        "PS4": format!("$(touch {})", m("ps4")),
        "ENV": format!("$(touch {})", m("env")),
        "PATH": format!("{}:/usr/bin:/bin", fake_bin.display()),
        "NODE_OPTIONS": "--require /nonexistent/evil.js",
        "PERL5OPT": "-Mstrict",
        "DECLARED": "kept",
    })
}

const INJECTED: [&str; 7] = [
    "BASH_ENV",
    "SHELLOPTS",
    "PS4",
    "ENV",
    "PATH",
    "NODE_OPTIONS",
    "PERL5OPT",
];

fn assert_warnings(warnings: &Value, what: &str) {
    let list: Vec<&str> = warnings
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no warnings list: {warnings}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for name in INJECTED {
        let expected = format!("{name} is not declared by this runbook");
        assert!(
            list.contains(&expected.as_str()),
            "{what}: no warning {expected:?} in {list:?}"
        );
    }
    assert!(
        !list.iter().any(|w| w.contains("DECLARED")),
        "{what}: a declared variable gives no warning: {list:?}"
    );
}

fn assert_nothing_injected(stdout: &str, root: &Path, what: &str) {
    for line in [
        "BASH_ENV=unset",
        "ENV=unset",
        "NODE_OPTIONS=unset",
        "PERL5OPT=unset",
        "PS4=default",
        "DECLARED=kept",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "{what}: no line {line:?} in {stdout:?}"
        );
    }
    let shellopts = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SHELLOPTS="))
        .unwrap();
    assert!(!shellopts.contains("xtrace"), "{what}: {shellopts}");
    let path = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PATH="))
        .unwrap();
    assert!(!path.contains("fake-bin"), "{what}: PATH={path}");
    assert_eq!(
        markers_in(root),
        Vec::<String>::new(),
        "{what}: an injection ran"
    );
}

#[test]
fn the_injections_work_on_bash_when_nothing_filters_them() {
    // The proof that the markers below can appear: bash given these variables directly.
    let root = unique_root();
    let script = root.join("probe.sh");
    fs::write(&script, PROBE).unwrap();
    let vars = injections(&root);
    let mut cmd = Command::new("/bin/bash");
    cmd.arg(&script).env_clear();
    for (name, value) in vars.as_object().unwrap() {
        cmd.env(name, value.as_str().unwrap());
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let markers = markers_in(&root);
    for marker in ["marker-bash-env", "marker-path"] {
        assert!(markers.iter().any(|m| m == marker), "{marker}: {stderr}");
    }
    assert!(
        stderr.contains("+ echo"),
        "SHELLOPTS=xtrace traces: {stderr}"
    );
    // bash does not import PS4 when it runs as root; for any other user it runs the command.
    let uid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        assert!(markers.iter().any(|m| m == "marker-ps4"), "{stderr}");
    }
    let _ = fs::remove_dir_all(&root);
}

#[test]
fn undeclared_request_variables_never_reach_the_script() {
    let server = Server::start(ServerOpts::new().runbook(
        "Probe.md",
        Runbook::new("Probe", PROBE).env("DECLARED", "a declared variable"),
    ));
    let token = dev_token();
    let vars = injections(&server.root);

    // Synchronous: the JSON result and the run record carry the warnings.
    let resp = server.execute("Probe.md", &token, vars.clone());
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    assert_nothing_injected(body["stdout"].as_str().unwrap(), &server.root, "sync");
    assert!(
        !body["stderr"].as_str().unwrap().contains("+ "),
        "no xtrace: {body}"
    );
    assert_warnings(&body["warnings"], "sync result");
    let record_file = server
        .state_dir()
        .join("runs")
        .join(format!("{}.json", body["run_id"].as_str().unwrap()));
    let record: Value = serde_json::from_slice(&fs::read(&record_file).unwrap()).unwrap();
    assert_warnings(&record["warnings"], "run record");

    // SSE: the done event carries them.
    let events = server
        .execute_sse("Probe.md", &token, vars.clone())
        .until_done(RUN_TIMEOUT);
    assert_nothing_injected(&joined(&events, "stdout"), &server.root, "sse");
    assert_warnings(&done_json(&events)["warnings"], "done event");

    // Validate names them too, and it is still a pass.
    let resp = server.validate("Probe.md", &token, vars);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_warnings(&resp.json()["warnings"], "validate");

    // LD_* and bad names stay 400.
    for bad in [json!({"LD_PRELOAD": "/x.so"}), json!({"A-B": "1"})] {
        let resp = server.execute("Probe.md", &token, bad.clone());
        assert_eq!(resp.status, 400, "{bad}: {}", resp.text());
    }
}

#[test]
fn a_runbook_declaring_a_startup_variable_fails_validation_naming_it() {
    let mut opts = ServerOpts::new();
    let names = [
        "BASH_ENV",
        "SHELLOPTS",
        "PS4",
        "PATH",
        "IFS",
        "ENV",
        "NODE_OPTIONS",
        "PYTHONPATH",
        "PERL5OPT",
        "RUBYOPT",
        "JAVA_TOOL_OPTIONS",
        "GCONV_PATH",
        "LD_PRELOAD",
    ];
    for name in names {
        opts = opts.runbook(
            &format!("{name}.md"),
            Runbook::new(name, "echo should-not-run").env(name, "declared"),
        );
    }
    let server = Server::start(opts);
    let token = dev_token();
    for name in names {
        let file = format!("{name}.md");
        // LD_* may not even be sent; the others are declared, so they are sent.
        let vars = if name.starts_with("LD_") {
            json!({})
        } else {
            json!({ name: "x" })
        };
        let resp = server.validate(&file, &token, vars.clone());
        assert_eq!(resp.status, 400, "{name}: {}", resp.text());
        let body = resp.json();
        let errors = body["errors"].to_string();
        assert!(
            errors.contains(&format!("{name} cannot be declared")),
            "{name}: {body}"
        );
        let resp = server.execute(&file, &token, vars);
        assert_eq!(resp.status, 500, "{name}: {}", resp.text());
        let body = resp.json();
        assert!(
            body["errors"]
                .to_string()
                .contains(&format!("{name} cannot be declared")),
            "{name}: {body}"
        );
        assert!(
            !body["stdout"]
                .as_str()
                .unwrap_or("")
                .contains("should-not-run"),
            "{name}: {body}"
        );
    }
}

#[test]
fn oversized_values_are_400_before_any_run_exists() {
    let mut book = Runbook::new("Big", "echo \"${#A}\"");
    for name in ["A", "B", "C", "D", "E"] {
        book = book.env(name, "a big value");
    }
    let server = Server::start(ServerOpts::new().runbook("Big.md", book));
    let token = dev_token();
    let runs_before = server.list_runs("?limit=1000", &token).len();
    let history_before = server.read_runbook("Big.md");

    let limit = 128 * 1024;
    let small = "x";
    let resp = server.execute(
        "Big.md",
        &token,
        json!({"A": "y".repeat(limit + 1), "B": small, "C": small, "D": small, "E": small}),
    );
    assert_eq!(resp.status, 400, "{}", resp.text());
    let error = resp.json()["error"].as_str().unwrap().to_string();
    assert!(
        error.contains("env_vars.A") && error.contains("128 KiB"),
        "{error}"
    );

    // Each under 128 KiB, 550 KiB together.
    let big = "z".repeat(110 * 1024);
    let all: Value = ["A", "B", "C", "D", "E"]
        .iter()
        .map(|n| (n.to_string(), json!(big)))
        .collect::<serde_json::Map<String, Value>>()
        .into();
    let resp = server.execute("Big.md", &token, all.clone());
    assert_eq!(resp.status, 400, "{}", resp.text());
    let error = resp.json()["error"].as_str().unwrap().to_string();
    assert!(error.contains("512 KiB"), "{error}");
    // The SSE form and validate refuse the same way.
    let resp = server.execute_raw("Big.md", "?stream=true", &token, all.clone(), &[]);
    assert_eq!(resp.status, 400, "{}", resp.text());
    let resp = server.validate("Big.md", &token, all);
    assert_eq!(resp.status, 400, "{}", resp.text());

    assert_eq!(
        server.list_runs("?limit=1000", &token).len(),
        runs_before,
        "no run was created"
    );
    assert_eq!(server.read_runbook("Big.md"), history_before);

    // 128 KiB counts `A=`, the value and the final NUL (the kernel's limit for one environment
    // string): one byte more is a 400, the largest value runs.
    let largest = limit - "A=".len() - 1;
    let resp = server.execute(
        "Big.md",
        &token,
        json!({"A": "y".repeat(largest + 1), "B": small, "C": small, "D": small, "E": small}),
    );
    assert_eq!(resp.status, 400, "{}", resp.text());
    let resp = server.execute(
        "Big.md",
        &token,
        json!({"A": "y".repeat(largest), "B": small, "C": small, "D": small, "E": small}),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["stdout"], json!(format!("{largest}\n")));
}

fn runbook_content(server: &Server, file: &str, token: &str) -> String {
    let resp = server.get(&format!("/api/runbooks/{file}"), Some(token));
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()["content"].as_str().unwrap().to_string()
}

#[test]
fn history_output_is_hidden_from_readers_without_the_claims() {
    let server = Server::start(
        ServerOpts::new().runbook(
            "Ops.md",
            Runbook::new(
                "Ops",
                "echo \"ops $((6 * 7)) output\"\necho \"ops $((6 * 7)) error\" >&2\n",
            )
            .claim("roles: ops"),
        ),
    );
    let alice = token("alice", &["ops"]);
    let bob = token("bob", &["developer"]);
    let carol = token("carol", &["ops"]);
    let resp = server.execute("Ops.md", &alice, json!({}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let run_id = resp.json()["run_id"].as_str().unwrap().to_string();
    let resp = server.execute("Ops.md", &bob, json!({}));
    assert_eq!(resp.status, 403, "{}", resp.text());

    let full = runbook_content(&server, "Ops.md", &carol);
    assert!(full.contains("ops 42 output"), "{full}");
    assert!(full.contains("ops 42 error"), "{full}");
    assert!(full.contains("RBAC"), "{full}");

    // Bob still lists and reads it, with each entry's heading only.
    let listed = server.get("/api/runbooks", Some(&bob)).json();
    assert!(listed.to_string().contains("Ops.md"), "{listed}");
    let reduced = runbook_content(&server, "Ops.md", &bob);
    assert!(!reduced.contains("ops 42"), "{reduced}");
    assert!(!reduced.contains("RBAC"), "{reduced}");
    assert!(!reduced.contains("**Stdout:**"), "{reduced}");
    let headings = |text: &str| -> Vec<(i64, Option<String>)> {
        history_entries(text)
            .iter()
            .map(|e| {
                let (_, code, run) = entry_header(e);
                (code, run)
            })
            .collect()
    };
    assert_eq!(
        headings(&reduced),
        vec![(0, Some(run_id.clone())), (403, None)],
        "{reduced}"
    );
    assert_eq!(headings(&reduced), headings(&full));
    // The script is still shown.
    assert!(
        reduced.contains("echo \"ops $((6 * 7)) output\""),
        "{reduced}"
    );
    let script_part = |text: &str| text[..text.find("\n# History").unwrap()].to_string();
    assert_eq!(script_part(&reduced), script_part(&full));

    // The run's own output stays refused to Bob everywhere else.
    for path in [
        format!("/api/runs/{run_id}"),
        format!("/api/runs/{run_id}/logs"),
        format!("/api/runs/{run_id}/logs/download"),
    ] {
        let resp = server.call("GET", &path, Some(&bob), &[], None);
        assert_eq!(resp.status, 403, "{path}: {}", resp.text());
    }
    assert_eq!(
        server.open_events(&run_id, Some(&bob), "", None).status,
        403
    );
}

#[test]
fn only_the_owner_or_an_administrator_meeting_the_claims_may_cancel() {
    let script = format!("echo started\n{}echo finished\n", wait_for_gate("GATE"));
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Open.md",
                Runbook::new("Open", &script).env("GATE", "gate file"),
            )
            .runbook(
                "Ops.md",
                Runbook::new("Ops", &script)
                    .env("GATE", "gate file")
                    .claim("roles: ops"),
            )
            .env("ADMIN_ROLES", "admin, sre"),
    );
    let alice = token("alice", &["ops"]);
    let bob = token("bob", &["developer"]);
    let ops_colleague = token("olga", &["ops"]);
    let admin = token("dana", &["admin"]);
    let sre_with_ops = token("sam", &["sre", "ops"]);
    let gate = Gate::new(&server.root, "never");
    let env = json!({"GATE": gate.path()});
    let cancelled = |id: &str| {
        let record = server.wait_finished(id, &alice, RUN_TIMEOUT);
        assert_eq!(record["status"], json!("cancelled"), "{record}");
    };

    // No Required Claims: another user (who can see the run) may not cancel it.
    let id = server.start_run("Open.md", &alice, env.clone());
    server.wait_output(&id, &alice, "stdout", "started", &|t| !t.is_empty());
    assert_eq!(server.run_record(&id, &bob)["status"], json!("running"));
    let resp = server.cancel(&id, &bob);
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert!(resp.json()["error"]
        .as_str()
        .unwrap()
        .contains("ADMIN_ROLES"));
    assert_eq!(server.run_record(&id, &alice)["status"], json!("running"));
    // The owner may.
    let resp = server.cancel(&id, &alice);
    assert_eq!(resp.status, 202, "{}", resp.text());
    cancelled(&id);

    // An administrator meets the claims of a runbook without any.
    let id = server.start_run("Open.md", &alice, env.clone());
    let resp = server.cancel(&id, &admin);
    assert_eq!(resp.status, 202, "{}", resp.text());
    cancelled(&id);

    // With Required Claims: a colleague holding them may see but not cancel; an administrator
    // without them may do neither; an administrator (here by the second ADMIN_ROLES entry)
    // holding them may cancel.
    let id = server.start_run("Ops.md", &alice, env.clone());
    assert_eq!(
        server.run_record(&id, &ops_colleague)["status"],
        json!("running")
    );
    for (who, tok) in [("ops colleague", &ops_colleague), ("admin", &admin)] {
        let resp = server.cancel(&id, tok);
        assert_eq!(resp.status, 403, "{who}: {}", resp.text());
    }
    assert_eq!(server.run_record(&id, &alice)["status"], json!("running"));
    let resp = server.cancel(&id, &sre_with_ops);
    assert_eq!(resp.status, 202, "{}", resp.text());
    cancelled(&id);
}

#[test]
fn validate_writes_no_history_but_a_refused_execute_does() {
    let server = Server::start(ServerOpts::new().runbook(
        "Admin.md",
        Runbook::new("Admin", "echo admin only").claim("roles: admin"),
    ));
    let before = server.read_runbook("Admin.md");
    for _ in 0..3 {
        let resp = server.json_request(
            "PATCH",
            "/api/runbooks/Admin.md/validate",
            &dev_token(),
            &json!({}),
        );
        assert_eq!(resp.status, 403, "{}", resp.text());
    }
    let resp = server.get("/api/runbooks/Admin.md/required-env", Some(&dev_token()));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        server.read_runbook("Admin.md"),
        before,
        "validate wrote history"
    );

    let resp = server.execute("Admin.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 403, "{}", resp.text());
    let entries = server.history_entries("Admin.md");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entry_header(&entries[0]).1, 403);
}

#[test]
fn refused_requests_never_push_a_run_out_of_history() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Ops.md",
                Runbook::new("Ops", "echo ran").claim("roles: ops"),
            )
            .env("HISTORY_MAX_ENTRIES", "3"),
    );
    let ops = token("olga", &["ops"]);
    let bob = token("bob", &["developer"]);
    let run = || {
        let resp = server.execute("Ops.md", &ops, json!({}));
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.json()["run_id"].as_str().unwrap().to_string()
    };
    let refuse = || {
        let resp = server.execute("Ops.md", &bob, json!({}));
        assert_eq!(resp.status, 403, "{}", resp.text());
    };
    let headings = || -> Vec<(i64, Option<String>)> {
        server
            .history_entries("Ops.md")
            .iter()
            .map(|e| {
                let (_, code, run) = entry_header(e);
                (code, run)
            })
            .collect()
    };

    let r1 = run();
    let r2 = run();
    for _ in 0..8 {
        refuse();
    }
    // The newest refusal takes the free place; no run went.
    assert_eq!(
        headings(),
        vec![(0, Some(r1.clone())), (0, Some(r2.clone())), (403, None)]
    );
    // A run pushes the refusal out, not a run.
    let r3 = run();
    assert_eq!(
        headings(),
        vec![
            (0, Some(r1.clone())),
            (0, Some(r2.clone())),
            (0, Some(r3.clone()))
        ]
    );
    for _ in 0..5 {
        refuse();
    }
    assert_eq!(
        headings(),
        vec![
            (0, Some(r1.clone())),
            (0, Some(r2.clone())),
            (0, Some(r3.clone()))
        ]
    );
    // Runs still replace the oldest run.
    let r4 = run();
    assert_eq!(
        headings(),
        vec![(0, Some(r2)), (0, Some(r3)), (0, Some(r4))]
    );
}
