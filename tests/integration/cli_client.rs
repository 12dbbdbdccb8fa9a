//! The terminal client as a person uses it: `exec` names the run first and ends with its
//! status line, Ctrl-C leaves the run going (or cancels it with `--cancel-on-interrupt`),
//! `cancel`, `runs`, `--version`; and the error words that help: an unknown runbook names the
//! nearest ones, a name without `.md` says so, a dev token from before a restart says why.

use serde_json::json;

use crate::runs_cli::{url, Cli};
use crate::runs_support::*;
use crate::util::*;

/// The run id from `runbookd: run ID started (RUNBOOK)`, which must be the first stderr line.
fn started_run_id(stderr: &str, runbook: &str) -> String {
    let first = stderr.lines().next().unwrap_or_default();
    let rest = first
        .strip_prefix("runbookd: run ")
        .unwrap_or_else(|| panic!("first stderr line is not the run line: {stderr:?}"));
    let (id, after) = rest
        .split_once(' ')
        .unwrap_or_else(|| panic!("no run id in {first:?}"));
    assert_eq!(after, format!("started ({runbook})"), "{stderr:?}");
    assert!(id.starts_with("r1-"), "{first:?}");
    id.to_string()
}

/// Checks that the last stderr line is `runbookd: run ID STATUS (exit CODE) in N.N s...`.
fn assert_final_line(stderr: &str, id: &str, status: &str, code: i32) {
    let last = stderr.lines().last().unwrap_or_default();
    let prefix = format!("runbookd: run {id} {status} (exit {code}) in ");
    let rest = last
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("last stderr line is not {prefix:?}...: {stderr:?}"));
    let seconds = rest.split(' ').next().unwrap_or_default();
    assert!(
        seconds.parse::<f64>().is_ok() && rest[seconds.len()..].starts_with(" s"),
        "no duration in {last:?}"
    );
}

/// A server with a runbook that prints, waits for the gate file named by `GATE`, prints
/// again and exits 0.
fn gated_server(file: &str) -> Server {
    let script = format!(
        "echo 'before the gate'\n{}echo 'after the gate'\n",
        wait_for_gate("GATE")
    );
    Server::start(ServerOpts::new().runbook(
        file,
        Runbook::new("Gated", &script).env("GATE", "gate file"),
    ))
}

/// Starts `runbookd exec Gated.md` and waits until the run printed its first line.
fn exec_gated(server: &Server, token: &str, gate: &Gate, extra: &[&str]) -> (Cli, String) {
    let gate_var = format!("GATE={}", gate.path());
    let mut args = vec!["exec", "Gated.md", "-e", &gate_var];
    args.extend_from_slice(extra);
    let mut cli = Cli::against(server.port, token, &args);
    wait_until(RUN_TIMEOUT, || {
        cli.exited() || cli.stdout().contains("before the gate\n")
    });
    assert_eq!(
        cli.stdout(),
        "before the gate\n",
        "stderr: {:?}",
        cli.stderr()
    );
    assert!(!cli.exited(), "stderr: {:?}", cli.stderr());
    let id = started_run_id(&cli.stderr(), "Gated.md");
    (cli, id)
}

#[test]
fn exec_names_the_run_first_and_ends_with_its_status_line() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Hello.md",
                Runbook::new("Hello", "echo hello\necho 'a note' >&2\n"),
            )
            .runbook("Broken.md", Runbook::new("Broken", "echo trying\nexit 3\n")),
    );
    let token = dev_token();
    let mut cli = Cli::against(server.port, &token, &["exec", "Hello.md"]);
    assert_eq!(cli.exit_code(RUN_TIMEOUT), 0);
    assert_eq!(cli.stdout(), "hello\n");
    let stderr = cli.stderr();
    let id = started_run_id(&stderr, "Hello.md");
    assert_eq!(stderr.lines().nth(1), Some("a note"), "{stderr:?}");
    assert_final_line(&stderr, &id, "succeeded", 0);
    assert_eq!(stderr.lines().count(), 3, "{stderr:?}");
    let record = server.run_record(&id, &token);
    assert_eq!(record["status"], json!("succeeded"));

    let mut failing = Cli::against(server.port, &token, &["exec", "Broken.md"]);
    assert_eq!(failing.exit_code(RUN_TIMEOUT), 3);
    assert_eq!(failing.stdout(), "trying\n");
    let stderr = failing.stderr();
    let id = started_run_id(&stderr, "Broken.md");
    assert_final_line(&stderr, &id, "failed", 3);
    assert_eq!(server.run_record(&id, &token)["return_code"], json!(3));

    // monitor of a finished run ends with the same kind of line.
    let mut monitor = Cli::against(server.port, &token, &["monitor", &id]);
    assert_eq!(monitor.exit_code(RUN_TIMEOUT), 3);
    assert_final_line(&monitor.stderr(), &id, "failed", 3);
}

#[test]
fn ctrl_c_leaves_the_run_going_and_says_how_to_follow_or_cancel_it() {
    let server = gated_server("Gated.md");
    let token = dev_token();
    let gate = Gate::new(&server.root, "ctrl-c");
    let (mut cli, id) = exec_gated(&server, &token, &gate, &[]);
    send_signal(cli.child.id(), "INT");
    assert_eq!(cli.exit_code(RUN_TIMEOUT), 130);
    let stderr = cli.stderr();
    assert!(stderr.contains(&format!("run {id} goes on")), "{stderr:?}");
    let port_url = url(server.port);
    assert!(
        stderr.contains(&format!("runbookd monitor {id} --url {port_url}\n")),
        "{stderr:?}"
    );
    assert!(
        stderr.contains(&format!("runbookd cancel {id} --url {port_url}\n")),
        "{stderr:?}"
    );
    // The run did not notice: it still waits, then finishes on its own.
    assert_eq!(server.run_record(&id, &token)["status"], json!("running"));
    gate.open();
    let record = server.wait_run(&id, &token, RUN_TIMEOUT, "finished", &|r| {
        r["status"] != json!("running")
    });
    assert_eq!(record["status"], json!("succeeded"), "{record}");
    assert_eq!(
        server.stored_output(&id, &token, ""),
        "before the gate\nafter the gate\n"
    );
}

#[test]
fn ctrl_c_with_cancel_on_interrupt_cancels_the_run() {
    let server = gated_server("Gated.md");
    let token = dev_token();
    let gate = Gate::new(&server.root, "never-opened");
    let (mut cli, id) = exec_gated(&server, &token, &gate, &["--cancel-on-interrupt"]);
    send_signal(cli.child.id(), "INT");
    let code = cli.exit_code(RUN_TIMEOUT);
    let stderr = cli.stderr();
    assert!(
        stderr.contains(&format!("interrupted; cancelling run {id}")),
        "{stderr:?}"
    );
    let record = server.run_record(&id, &token);
    assert_eq!(record["status"], json!("cancelled"), "{record}");
    let return_code = record["return_code"].as_i64().unwrap();
    assert_final_line(&stderr, &id, "cancelled", return_code as i32);
    assert_eq!(
        code,
        if return_code < 0 {
            1
        } else {
            (return_code & 255) as i32
        }
    );
    assert!(!stderr.contains("goes on"), "{stderr:?}");
}

#[test]
fn cancel_and_runs_from_the_terminal() {
    let server = gated_server("Gated.md");
    let token = dev_token();
    let gate = Gate::new(&server.root, "runs");
    let done_id = {
        gate.open();
        let id = server.start_run("Gated.md", &token, json!({"GATE": gate.path()}));
        server.wait_run(&id, &token, RUN_TIMEOUT, "succeeded", &|r| {
            r["status"] == json!("succeeded")
        });
        id
    };
    let waiting = Gate::new(&server.root, "cancel");
    let id = server.start_run("Gated.md", &token, json!({"GATE": waiting.path()}));

    let mut runs = Cli::against(server.port, &token, &["runs"]);
    assert_eq!(runs.exit_code(RUN_TIMEOUT), 0, "{:?}", runs.stderr());
    let listing = runs.stdout();
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 3, "{listing}");
    for header in ["RUN ID", "STATUS", "RUNBOOK", "USER", "STARTED", "DURATION"] {
        assert!(lines[0].contains(header), "{listing}");
    }
    assert!(lines[1].starts_with(&id), "newest first: {listing}");
    assert!(
        lines[1].contains(" running ") && lines[1].contains("so far"),
        "{listing}"
    );
    assert!(lines[2].starts_with(&done_id), "{listing}");
    assert!(
        lines[2].contains(" succeeded ")
            && lines[2].contains("Gated.md")
            && lines[2].contains("dev-tester"),
        "{listing}"
    );

    let mut cancel = Cli::against(server.port, &token, &["cancel", &id]);
    assert_eq!(cancel.exit_code(RUN_TIMEOUT), 0, "{:?}", cancel.stderr());
    let record = server.run_record(&id, &token);
    assert_eq!(record["status"], json!("cancelled"), "{record}");
    assert_final_line(
        &cancel.stderr(),
        &id,
        "cancelled",
        record["return_code"].as_i64().unwrap() as i32,
    );
    let mut again = Cli::against(server.port, &token, &["cancel", &id]);
    assert_eq!(again.exit_code(RUN_TIMEOUT), 2);
    assert!(
        again.stderr().contains("not running"),
        "{:?}",
        again.stderr()
    );

    let mut filtered = Cli::against(
        server.port,
        &token,
        &["runs", "--status", "cancelled", "--limit", "5"],
    );
    assert_eq!(filtered.exit_code(RUN_TIMEOUT), 0);
    let listing = filtered.stdout();
    assert_eq!(listing.lines().count(), 2, "{listing}");
    assert!(
        listing.lines().nth(1).unwrap().starts_with(&id),
        "{listing}"
    );
    let mut none = Cli::against(server.port, &token, &["runs", "--runbook", "Other.md"]);
    assert_eq!(none.exit_code(RUN_TIMEOUT), 0);
    assert_eq!(none.stdout(), "");
    assert_eq!(none.stderr(), "runbookd: no runs found\n");
}

#[test]
fn version_and_help() {
    let mut version = Cli::start(&["--version"], &[]);
    assert_eq!(version.exit_code(RUN_TIMEOUT), 0);
    assert_eq!(
        version.stdout(),
        format!("runbookd {}\n", env!("CARGO_PKG_VERSION"))
    );
    for sub in ["exec", "monitor", "cancel", "runs"] {
        let mut help = Cli::start(&[sub, "--help"], &[]);
        assert_eq!(help.exit_code(RUN_TIMEOUT), 0);
        assert!(
            help.stdout().starts_with(&format!("Usage: runbookd {sub}")),
            "{}",
            help.stdout()
        );
    }
}

#[test]
fn an_unknown_runbook_names_the_nearest_ones() {
    let server = Server::start(
        ServerOpts::new()
            .runbook("HelloWorld.md", Runbook::new("Hello", "echo hi\n"))
            .runbook("Ticker.md", Runbook::new("Ticker", "echo tick\n")),
    );
    let token = dev_token();
    let wanted = "runbook Helloworld.md not found; did you mean HelloWorld.md?";
    let mut cli = Cli::against(server.port, &token, &["exec", "Helloworld.md"]);
    assert_eq!(cli.exit_code(RUN_TIMEOUT), 2);
    assert_eq!(cli.stderr(), format!("runbookd: {wanted} (HTTP 404)\n"));
    assert_eq!(cli.stdout(), "");

    let resp = server.execute("Helloworld.md", &token, json!({}));
    assert_eq!(resp.status, 404);
    assert_eq!(resp.json(), json!({"success": false, "error": wanted}));
    let resp = server.get("/api/runbooks/Tickr.md", Some(&token));
    assert_eq!(resp.status, 404);
    assert_eq!(
        resp.json()["error"],
        json!("runbook Tickr.md not found; did you mean Ticker.md?")
    );
    let resp = server.get(
        "/api/runbooks/Nothing%20Alike.md/required-env",
        Some(&token),
    );
    assert_eq!(resp.status, 404);
    assert_eq!(
        resp.json()["error"],
        json!("runbook Nothing Alike.md not found")
    );

    // Without .md: a hint instead of "invalid runbook file name".
    let hint = "bad request: runbook names end in .md: did you mean HelloWorld.md?";
    let mut cli = Cli::against(server.port, &token, &["exec", "HelloWorld"]);
    assert_eq!(cli.exit_code(RUN_TIMEOUT), 2);
    assert_eq!(cli.stderr(), format!("runbookd: {hint} (HTTP 400)\n"));
    let resp = server.execute("HelloWorld", &token, json!({}));
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["error"], json!(hint));
    let resp = server.json_request(
        "PATCH",
        "/api/runbooks/helloworld/validate",
        &token,
        &json!({}),
    );
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["error"], json!(hint));
    assert_eq!(server.list_runs("", &token).len(), 0);
}

#[test]
fn a_run_token_gets_no_runbook_names_it_may_not_list() {
    let server = gated_server("Gated.md");
    let token = dev_token();
    let gate = Gate::new(&server.root, "scope");
    let id = server.start_run("Gated.md", &token, json!({"GATE": gate.path()}));
    let mut c = claims("dev-tester", json!(["developer"]));
    c["run_id"] = json!(id);
    c["rbk_stack"] = json!(["Gated.md"]);
    let run_token = sign_hs256(&c, TEST_SECRET.as_bytes());
    let resp = server.execute("gated.md", &run_token, json!({}));
    assert_eq!(resp.status, 404, "{}", resp.text());
    assert_eq!(resp.json()["error"], json!("runbook gated.md not found"));
    let resp = server.execute("Gated", &run_token, json!({}));
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert_eq!(
        resp.json()["error"],
        json!("bad request: runbook names end in .md, as in Gated.md")
    );
    // The same request with a user token is told the name.
    let resp = server.execute("gated.md", &token, json!({}));
    assert_eq!(
        resp.json()["error"],
        json!("runbook gated.md not found; did you mean Gated.md?")
    );
    gate.open();
    server.wait_finished(&id, &token, RUN_TIMEOUT);
}

#[test]
fn a_dev_token_from_before_a_restart_says_why_it_is_refused() {
    // Dev login with a secret generated at start (no JWT_SECRET).
    let mut daemon = Daemon::start(&[], &[("ENABLE_LOGIN", "true"), ("JWT_SECRET", "")]);
    let login = daemon.call(
        "POST",
        "/dev-login",
        None,
        &[("Content-Type", "application/json")],
        Some(b"{}"),
    );
    assert_eq!(login.status, 200, "{}", login.text());
    let token = login.json()["access_token"].as_str().unwrap().to_string();
    let resp = daemon.call("GET", "/api/runbooks", Some(&token), &[], None);
    assert_eq!(resp.status, 200, "{}", resp.text());

    daemon.kill9();
    daemon.restart(&[]);
    let resp = daemon.call("GET", "/api/runbooks", Some(&token), &[], None);
    assert_eq!(resp.status, 401);
    assert_eq!(
        resp.json()["error"],
        json!("unauthorized: invalid token: invalid token signature (dev-login tokens are only valid until the server restarts; sign in again)")
    );
    // The CLI shows the server's words as they are.
    let mut cli = Cli::against(daemon.port, &token, &["runs"]);
    assert_eq!(cli.exit_code(RUN_TIMEOUT), 2);
    assert!(
        cli.stderr()
            .contains("dev-login tokens are only valid until the server restarts"),
        "{:?}",
        cli.stderr()
    );

    // With a configured secret there is nothing to hint at.
    let server = Server::start(ServerOpts::new().env("ENABLE_LOGIN", "true"));
    let resp = server.get("/api/runbooks", Some(&token));
    assert_eq!(resp.status, 401);
    assert_eq!(
        resp.json()["error"],
        json!("unauthorized: invalid token: invalid token signature")
    );
}
