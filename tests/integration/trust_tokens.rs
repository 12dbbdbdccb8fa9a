//! Run tokens: a script's RUNBOOK_API_TOKEN executes sub-runbooks (its recursion stack comes
//! from the token, not from a header) and reads its own run and the runs under it, nothing
//! else; it is refused once its run has ended; and the sub-runs MAX_CONCURRENT_RUNS does not
//! count are capped per tree by MAX_SUBRUNS_PER_RUN. The scripts write their token to a file
//! (output masks it) and wait for a per-run gate, so the test uses the token over its own
//! sockets while the run is held open.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::runs_support::*;
use crate::util::*;

/// Writes its run token to `$DIR/<run id>.tok`, prints its stack, and waits for
/// `$DIR/<run id>.open`.
const HOLDER: &str = r#"printf %s "$RUNBOOK_API_TOKEN" > "$DIR/$RUNBOOK_RUN_ID.tmp"
mv "$DIR/$RUNBOOK_RUN_ID.tmp" "$DIR/$RUNBOOK_RUN_ID.tok"
echo "stack=$RUNBOOK_RECURSION_STACK"
while [ ! -e "$DIR/$RUNBOOK_RUN_ID.open" ]; do sleep 0.02; done
echo released
"#;

fn holder(name: &str) -> Runbook {
    Runbook::new(name, HOLDER).env("DIR", "where the token goes")
}

/// A server with the holder runbooks `Holder.md`, `Other.md` and `Third.md`.
fn holder_server(env: &[(&str, &str)]) -> (Server, PathBuf) {
    let mut opts = ServerOpts::new()
        .runbook("Holder.md", holder("Holder"))
        .runbook("Other.md", holder("Other"))
        .runbook("Third.md", holder("Third"));
    for (k, v) in env {
        opts = opts.env(k, v);
    }
    let server = Server::start(opts);
    let dir = server.root.join("tokens");
    fs::create_dir_all(&dir).unwrap();
    (server, dir)
}

fn dir_env(dir: &Path) -> Value {
    json!({"DIR": dir.display().to_string()})
}

/// The run token the holder run `id` wrote.
fn token_of(dir: &Path, id: &str) -> String {
    let path = dir.join(format!("{id}.tok"));
    poll_until(
        RUN_TIMEOUT,
        || fs::read_to_string(&path).ok(),
        |t| t.as_ref().is_some_and(|t| !t.is_empty()),
        |_| format!("run {id} wrote no token"),
    )
    .unwrap()
}

/// Lets the holder run `id` end.
fn release(dir: &Path, id: &str) {
    fs::write(dir.join(format!("{id}.open")), b"open").unwrap();
}

/// Starts `file` with `token` (`?async=true`, an empty X-Recursion-Stack header) → the answer.
fn start_with(server: &Server, file: &str, token: &str, dir: &Path) -> Response {
    server.execute_raw(
        file,
        "?async=true",
        token,
        dir_env(dir),
        &[("X-Recursion-Stack", "[]")],
    )
}

fn started(resp: &Response) -> String {
    assert_eq!(resp.status, 202, "{}", resp.text());
    resp.json()["run_id"].as_str().unwrap().to_string()
}

fn ids(runs: &[Value]) -> BTreeSet<String> {
    runs.iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect()
}

fn status_of(server: &Server, method: &str, path: &str, token: &str) -> (u16, String) {
    let resp = server.call(method, path, Some(token), &[], None);
    (resp.status, resp.text())
}

/// The head status of a streaming GET (the body is not read).
fn stream_status(server: &Server, path: &str, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    let resp = open(
        server.port,
        "HTTP/1.1",
        "GET",
        path,
        &[("Authorization", &auth)],
        None,
    );
    let status = resp.status;
    resp.disconnect();
    status
}

#[test]
fn a_run_token_reads_only_its_own_run_and_its_sub_runs() {
    let (server, dir) = holder_server(&[("ENABLE_LOGIN", "true")]);
    let user = dev_token();
    let root = server.start_run("Holder.md", &user, dir_env(&dir));
    // The same user's unrelated run, and another user's run.
    let unrelated = server.start_run("Holder.md", &user, dir_env(&dir));
    let bob = token("bob", &["developer"]);
    let bobs = server.start_run("Other.md", &bob, dir_env(&dir));
    let root_token = token_of(&dir, &root);
    let payload = decode_segment(root_token.split('.').nth(1).unwrap());
    assert_eq!(payload["run_id"], json!(root), "{payload}");
    assert_eq!(payload["rbk_stack"], json!(["Holder.md"]), "{payload}");

    let sub = started(&start_with(&server, "Other.md", &root_token, &dir));
    let sub_token = token_of(&dir, &sub);

    assert_eq!(
        ids(&server.list_runs("", &root_token)),
        BTreeSet::from([root.clone(), sub.clone()])
    );
    assert_eq!(
        ids(&server.list_runs("", &sub_token)),
        BTreeSet::from([sub.clone()])
    );
    // The user token sees all four (no Required Claims).
    assert_eq!(ids(&server.list_runs("", &user)).len(), 4);

    for id in [&root, &sub] {
        for path in [format!("/api/runs/{id}"), format!("/api/runs/{id}/logs")] {
            let (status, text) = status_of(&server, "GET", &path, &root_token);
            assert_eq!(status, 200, "{path}: {text}");
        }
        for path in [
            format!("/api/runs/{id}/events"),
            format!("/api/runs/{id}/logs/download"),
        ] {
            assert_eq!(stream_status(&server, &path, &root_token), 200, "{path}");
        }
    }
    let via_query = format!("/api/runs/{root}/events?access_token={root_token}");
    let resp = open(server.port, "HTTP/1.1", "GET", &via_query, &[], None);
    assert_eq!(resp.status, 200, "a run token as ?access_token");
    resp.disconnect();

    // Another run of the same user, another user's run, and the parent from the child: 403.
    for (id, token) in [
        (&unrelated, &root_token),
        (&bobs, &root_token),
        (&root, &sub_token),
    ] {
        for path in [
            format!("/api/runs/{id}"),
            format!("/api/runs/{id}/logs"),
            format!("/api/runs/{id}/events"),
            format!("/api/runs/{id}/logs/download"),
        ] {
            let (status, text) = status_of(&server, "GET", &path, token);
            assert_eq!(status, 403, "{path}: {text}");
            assert!(text.contains("its own run and its sub-runs"), "{text}");
        }
    }
    // Nothing else: cancel (even of its own sub-run), config, runbooks, validate, dev-login.
    for (method, path) in [
        ("DELETE", format!("/api/runs/{unrelated}")),
        ("DELETE", format!("/api/runs/{sub}")),
        ("GET", "/api/config".to_string()),
        ("GET", "/api/runbooks".to_string()),
        ("GET", "/api/runbooks/Holder.md".to_string()),
        ("GET", "/api/runbooks/Holder.md/required-env".to_string()),
    ] {
        let (status, text) = status_of(&server, method, &path, &root_token);
        assert_eq!(status, 403, "{method} {path}: {text}");
        assert!(text.contains("a run token may only"), "{text}");
    }
    let validate = server.json_request(
        "PATCH",
        "/api/runbooks/Holder.md/validate",
        &root_token,
        &json!({}),
    );
    assert_eq!(validate.status, 403, "{}", validate.text());
    let login = server.json_request(
        "POST",
        "/dev-login",
        &root_token,
        &json!({"roles": ["admin"]}),
    );
    assert_eq!(login.status, 403, "{}", login.text());
    // Nothing was cancelled.
    for id in [&unrelated, &sub] {
        assert_eq!(server.run_record(id, &user)["status"], json!("running"));
    }

    // The sub-run's token dies with the sub-run; the parent's lives on.
    release(&dir, &sub);
    server.wait_finished(&sub, &user, RUN_TIMEOUT);
    let resp = server.call(
        "GET",
        &format!("/api/runs/{sub}"),
        Some(&sub_token),
        &[],
        None,
    );
    assert_eq!(resp.status, 401, "{}", resp.text());
    assert_eq!(resp.json()["success"], json!(false));
    assert!(
        resp.json()["error"]
            .as_str()
            .unwrap()
            .contains("the run this token belongs to has ended"),
        "{}",
        resp.text()
    );
    assert_eq!(
        ids(&server.list_runs("", &root_token)),
        BTreeSet::from([root.clone(), sub.clone()])
    );

    release(&dir, &root);
    server.wait_finished(&root, &user, RUN_TIMEOUT);
    for (method, path) in [
        ("GET", "/api/runs".to_string()),
        ("GET", format!("/api/runs/{root}")),
        ("GET", "/api/config".to_string()),
    ] {
        let (status, text) = status_of(&server, method, &path, &root_token);
        assert_eq!(status, 401, "{method} {path}: {text}");
        assert!(text.contains("has ended"), "{text}");
    }
    let resp = start_with(&server, "Third.md", &root_token, &dir);
    assert_eq!(resp.status, 401, "{}", resp.text());
    for id in [&unrelated, &bobs] {
        release(&dir, id);
    }
}

#[test]
fn a_run_tokens_stack_cannot_be_shortened_by_a_header() {
    let (server, dir) =
        holder_server(&[("MAX_RECURSION_DEPTH", "2"), ("MAX_SUBRUNS_PER_RUN", "2")]);
    let user = dev_token();
    let root = server.start_run("Holder.md", &user, dir_env(&dir));
    let root_token = token_of(&dir, &root);
    let execute_with_stack = |file: &str, token: &str, stack: &str| {
        server.execute_raw(
            file,
            "",
            token,
            dir_env(&dir),
            &[("X-Recursion-Stack", stack)],
        )
    };

    // A cycle, with a forged empty stack: refused as a failed run.
    let resp = execute_with_stack("Holder.md", &root_token, "[]");
    assert_eq!(resp.status, 500, "{}", resp.text());
    let body = resp.json();
    assert!(
        body["stderr"]
            .as_str()
            .unwrap()
            .contains("Holder.md is already in the call stack"),
        "{body}"
    );

    let sub = started(&start_with(&server, "Other.md", &root_token, &dir));
    let sub_token = token_of(&dir, &sub);
    let payload = decode_segment(sub_token.split('.').nth(1).unwrap());
    assert_eq!(payload["rbk_stack"], json!(["Holder.md", "Other.md"]));

    // Depth: the sub-run's stack is already MAX_RECURSION_DEPTH long, whatever the header says.
    for header in ["[]", "not json", "[\"Other.md\"]"] {
        let resp = execute_with_stack("Third.md", &sub_token, header);
        assert_eq!(resp.status, 500, "{header}: {}", resp.text());
        let stderr = resp.json()["stderr"].as_str().unwrap().to_string();
        assert!(stderr.contains("MAX_RECURSION_DEPTH"), "{header}: {stderr}");
    }
    // A user token's header is still believed (and earns no exemption).
    let resp = execute_with_stack("Holder.md", &user, "[\"Holder.md\"]");
    assert_eq!(resp.status, 500, "{}", resp.text());

    release(&dir, &sub);
    release(&dir, &root);
    server.wait_finished(&root, &user, RUN_TIMEOUT);
}

#[test]
fn sub_runs_beyond_max_subruns_per_run_count_against_max_concurrent_runs() {
    let (server, dir) = holder_server(&[
        ("MAX_CONCURRENT_RUNS", "2"),
        ("MAX_RECURSION_DEPTH", "3"),
        ("MAX_SUBRUNS_PER_RUN", "3"),
    ]);
    let user = dev_token();
    let root = server.start_run("Holder.md", &user, dir_env(&dir));
    let root_token = token_of(&dir, &root);

    // Three exempt sub-runs in root's tree: two children and a grandchild.
    let child1 = started(&start_with(&server, "Other.md", &root_token, &dir));
    let child1_token = token_of(&dir, &child1);
    let grandchild = started(&start_with(&server, "Third.md", &child1_token, &dir));
    let child2 = started(&start_with(&server, "Other.md", &root_token, &dir));
    // The fourth counts like any run: it takes the second slot of MAX_CONCURRENT_RUNS.
    let counted = started(&start_with(&server, "Other.md", &root_token, &dir));
    // Now the tree is at its cap and the server is full.
    for token in [&root_token, &child1_token] {
        let resp = start_with(&server, "Third.md", token, &dir);
        assert_eq!(resp.status, 429, "{}", resp.text());
        let retry = resp.header("Retry-After").expect("Retry-After on 429");
        assert!(retry.trim().parse::<u64>().is_ok(), "{retry:?}");
    }
    let resp = start_with(&server, "Third.md", &user, &dir);
    assert_eq!(
        resp.status,
        429,
        "the user's own runs are held too: {}",
        resp.text()
    );

    // An exempt sub-run ending makes room in the tree again.
    release(&dir, &grandchild);
    server.wait_finished(&grandchild, &user, RUN_TIMEOUT);
    let again = started(&server.execute_when_admitted(
        "Third.md",
        "?async=true",
        &child1_token,
        dir_env(&dir),
        &[],
    ));

    for id in [&again, &counted, &child2, &child1, &root] {
        release(&dir, id);
        server.wait_finished(id, &user, RUN_TIMEOUT);
    }
}

#[test]
fn run_tokens_from_before_a_restart_are_refused() {
    let mut daemon = Daemon::start(
        &[("Holder.md", holder("Holder").render())],
        &[("SHUTDOWN_GRACE_SECONDS", "2")],
    );
    let dir = daemon.root.join("tokens");
    fs::create_dir_all(&dir).unwrap();
    let user = dev_token();
    let id = daemon.start_run("Holder.md", &user, dir_env(&dir));
    let run_token = token_of(&dir, &id);
    let resp = daemon.call(
        "GET",
        &format!("/api/runs/{id}"),
        Some(&run_token),
        &[],
        None,
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    daemon.kill9();
    daemon.restart(&[]);
    let resp = daemon.call(
        "GET",
        &format!("/api/runs/{id}"),
        Some(&run_token),
        &[],
        None,
    );
    assert_eq!(resp.status, 401, "{}", resp.text());
    assert!(resp.text().contains("has ended"), "{}", resp.text());
    release(&dir, &id);
}

#[test]
fn max_subruns_per_run_below_the_recursion_depth_stops_the_start() {
    let root = unique_root();
    let mut cmd = base_command();
    cmd.current_dir(&root)
        .env("API_PORT", "0")
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("STATE_DIR", root.join("state"))
        .env("JWT_SECRET", TEST_SECRET)
        .env("MAX_RECURSION_DEPTH", "10")
        .env("MAX_SUBRUNS_PER_RUN", "9")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("runbookd started with MAX_SUBRUNS_PER_RUN < MAX_RECURSION_DEPTH");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let _ = fs::remove_dir_all(&root);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.contains("MAX_SUBRUNS_PER_RUN") && stderr.contains("MAX_RECURSION_DEPTH"),
        "{stderr:?}"
    );
}
