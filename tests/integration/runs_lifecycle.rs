//! The life of runs around the server: cancel (TERM, grace, KILL), MAX_CONCURRENT_RUNS with
//! the sub-runbook exemption, `# Concurrency`, kill -9 of the server and a restart on the same
//! STATE_DIR, retention at start, and graceful shutdown on SIGTERM.

use std::collections::BTreeSet;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::runs_support::*;
use crate::util::*;

/// Prints its process group id (sh is the group leader), ignores TERM, and keeps a background
/// and a foreground process that ignore it too.
const STUBBORN: &str = "echo \"pgid=$$\"\ntrap '' TERM\nsleep 100 &\nsleep 100\n";

/// The script's process group, read from its `pgid=` line, once it has `members` processes;
/// the guard kills what is left of it when the test ends.
fn watched_group(sse: &mut SseStream, members: usize) -> (u32, GroupGuard) {
    let events = events_until(sse, RUN_TIMEOUT, "with pgid=", &|e| {
        e.event == "stdout" && e.data.contains("pgid=")
    });
    let pgid = number_after(&joined(&events, "stdout"), "pgid=");
    let guard = GroupGuard(pgid);
    assert!(
        wait_until(Duration::from_secs(10), || group_members(pgid).len()
            >= members),
        "{members} processes expected in group {pgid}: {:?}",
        group_members(pgid)
    );
    (pgid, guard)
}

/// Whether `pgid` leads its group (its own pgrp is itself).
fn is_group_leader(pgid: u32) -> bool {
    group_members(pgid).contains(&pgid)
}

#[test]
fn cancel_ends_a_term_ignoring_group_within_the_grace() {
    let server = Server::start(
        ServerOpts::new()
            .runbook("Stubborn.md", Runbook::new("Stubborn", STUBBORN))
            .env("CANCEL_GRACE_SECONDS", "2"),
    );
    let token = dev_token();
    let mut sse = server.execute_sse("Stubborn.md", &token, json!({}));
    let id = sse.resp.header("X-Run-Id").unwrap().to_string();
    // sh and two sleeps.
    let (pgid, _guard) = watched_group(&mut sse, 3);
    assert!(is_group_leader(pgid), "pgid={pgid} is not a group leader");

    let t = Instant::now();
    let resp = server.cancel(&id, &token);
    assert_eq!(resp.status, 202, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["status"], json!("cancelling"), "{body}");
    assert_eq!(body["success"], json!(true), "{body}");
    assert_eq!(
        server.run_record(&id, &token)["status"],
        json!("cancelling")
    );
    assert!(
        !group_members(pgid).is_empty(),
        "TERM is ignored, so the group lives on during the grace"
    );

    let record = server.wait_finished(&id, &token, Duration::from_secs(30));
    let took = t.elapsed();
    let left = group_members(pgid);
    assert_eq!(record["status"], json!("cancelled"), "{record}");
    assert!(
        left.is_empty(),
        "processes of group {pgid} left when the run was cancelled: {left:?}"
    );
    // Loose: the point is that KILL follows the 2 s grace (the script would run 100 s), not
    // how promptly on a loaded machine.
    assert!(
        took <= Duration::from_secs(10),
        "cancelled after {took:?}, far more than CANCEL_GRACE_SECONDS (2 s)"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "cancelled after {took:?}: the grace before KILL was not given"
    );
    let events = sse.until_end(Duration::from_secs(10));
    let done = done_json(&events);
    assert_eq!(done["success"], json!(false), "{done}");

    let again = server.cancel(&id, &token);
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(again.json()["success"], json!(false));
}

#[test]
fn cancel_of_a_cooperative_script_ends_without_waiting_for_the_grace() {
    let script = "echo \"pgid=$$\"\ntrap 'echo got-term; exit 5' TERM\nsleep 100 &\nwait\n";
    let server = Server::start(
        ServerOpts::new()
            .runbook("Polite.md", Runbook::new("Polite", script))
            .env("CANCEL_GRACE_SECONDS", "20"),
    );
    let token = dev_token();
    let id = server.start_run("Polite.md", &token, json!({}));
    let mut sse = server.attach(&id, &token, "", None);
    let (pgid, _guard) = watched_group(&mut sse, 2);

    let t = Instant::now();
    let resp = server.cancel(&id, &token);
    assert_eq!(resp.status, 202, "{}", resp.text());
    let record = server.wait_finished(&id, &token, Duration::from_secs(30));
    assert!(
        t.elapsed() < Duration::from_secs(12),
        "a group that obeys TERM was still waited for (grace 20 s): {:?}",
        t.elapsed()
    );
    // It exited by itself during the grace: still `cancelled`.
    assert_eq!(record["status"], json!("cancelled"), "{record}");
    assert!(group_members(pgid).is_empty());
    let events = sse.until_end(Duration::from_secs(10));
    assert!(
        joined(&events, "stdout").contains("got-term\n"),
        "the script's TERM handler ran: {:?}",
        joined(&events, "stdout")
    );
}

#[test]
fn scripts_start_with_no_signal_blocked() {
    // exec: the mask is the one the shell was started with (a blocked TERM would make every
    // cancel, timeout and shutdown wait for the KILL after the grace).
    let server = Server::start(ServerOpts::new().runbook(
        "Mask.md",
        Runbook::new("Mask", "exec grep -E '^SigBlk' /proc/self/status\n"),
    ));
    let body = server.execute("Mask.md", &dev_token(), json!({})).json();
    assert_eq!(
        body["stdout"],
        json!("SigBlk:\t0000000000000000\n"),
        "signals blocked in the script: {body}"
    );
}

fn gated(name: &str) -> Runbook {
    Runbook::new(
        name,
        &format!("echo started\n{}echo finished\n", wait_for_gate("GATE")),
    )
    .env("GATE", "gate file")
}

fn run_ids_of(runs: &[Value]) -> BTreeSet<String> {
    runs.iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect()
}

/// A token like the one the server gives a run's script: the caller's subject and roles plus
/// `run_id` and `rbk_stack` claims.
fn run_token(run_id: &str, stack: &[&str]) -> String {
    let mut c = claims("dev-tester", json!(["developer"]));
    c["run_id"] = json!(run_id);
    c["rbk_stack"] = json!(stack);
    sign_hs256(&c, TEST_SECRET.as_bytes())
}

#[test]
fn executes_beyond_max_concurrent_runs_get_429() {
    let server = Server::start(
        ServerOpts::new()
            .runbook("Gated.md", gated("Gated"))
            .runbook("Quick.md", Runbook::new("Quick", "echo quick\n"))
            .env("MAX_CONCURRENT_RUNS", "2"),
    );
    let token = dev_token();
    let gate = Gate::new(&server.root, "gated");
    let env = json!({"GATE": gate.path()});
    let r1 = server.start_run("Gated.md", &token, env.clone());
    let r2 = server.start_run("Gated.md", &token, env.clone());

    for (query, extra) in [
        ("", vec![]),
        ("", vec![("Accept", "text/event-stream")]),
        ("?async=true", vec![]),
        // Claiming to be a sub-runbook call without a run token does not help.
        ("", vec![("X-Recursion-Stack", "[\"Gated.md\"]")]),
    ] {
        let resp = server.execute_raw("Quick.md", query, &token, json!({}), &extra);
        assert_eq!(resp.status, 429, "{query} {extra:?}: {}", resp.text());
        let retry = resp
            .header("Retry-After")
            .unwrap_or_else(|| panic!("no Retry-After: {:?}", resp.headers));
        assert!(retry.trim().parse::<u64>().is_ok(), "Retry-After {retry:?}");
        let body = resp.json();
        assert_eq!(body["success"], json!(false));
        assert!(
            body["error"].as_str().is_some_and(|e| e.len() > 10),
            "a clear error: {body}"
        );
    }
    // Nothing was started.
    assert_eq!(
        run_ids_of(&server.list_runs("", &token)),
        BTreeSet::from([r1.clone(), r2.clone()])
    );
    assert!(server.history_entries("Quick.md").is_empty());

    // A sub-runbook call (the run token of a running run) is not counted.
    let sub = server.execute_raw(
        "Quick.md",
        "",
        &run_token(&r1, &["Gated.md"]),
        json!({}),
        &[],
    );
    assert_eq!(sub.status, 200, "{}", sub.text());
    assert_eq!(sub.json()["stdout"], json!("quick\n"));

    gate.open();
    for id in [&r1, &r2] {
        assert_eq!(
            server.wait_finished(id, &token, RUN_TIMEOUT)["status"],
            json!("succeeded")
        );
    }
    // The freed slots take new runs.
    let resp = server.execute_when_admitted("Quick.md", "", &token, json!({}), &[]);
    assert_eq!(resp.status, 200, "{}", resp.text());
}

#[test]
fn a_finished_runs_token_is_refused() {
    let server = Server::start(
        ServerOpts::new()
            .runbook("Gated.md", gated("Gated"))
            .runbook("Quick.md", Runbook::new("Quick", "echo quick\n"))
            .env("MAX_CONCURRENT_RUNS", "1"),
    );
    let token = dev_token();
    let finished = server.execute("Quick.md", &token, json!({}));
    assert_eq!(finished.status, 200);
    let finished_id = finished.json()["run_id"].as_str().unwrap().to_string();
    let gate = Gate::new(&server.root, "gated");
    let started = server.execute_when_admitted(
        "Gated.md",
        "?async=true",
        &token,
        json!({"GATE": gate.path()}),
        &[],
    );
    assert_eq!(started.status, 202, "{}", started.text());
    let running = started.json()["run_id"].as_str().unwrap().to_string();
    let resp = server.execute_raw(
        "Quick.md",
        "",
        &run_token(&finished_id, &["Quick.md"]),
        json!({}),
        &[],
    );
    assert_eq!(resp.status, 401, "{}", resp.text());
    assert!(resp
        .text()
        .contains("the run this token belongs to has ended"));
    gate.open();
    server.wait_finished(&running, &token, RUN_TIMEOUT);
}

#[test]
fn a_run_is_settled_when_its_result_arrives() {
    // A client that got a run's result may at once look at its record or start the next run
    // in the slot it held.
    let server = Server::start(
        ServerOpts::new()
            .runbook("Quick.md", Runbook::new("Quick", "echo quick\n"))
            .env("MAX_CONCURRENT_RUNS", "1"),
    );
    let token = dev_token();
    for round in 0..50 {
        let resp = server.execute("Quick.md", &token, json!({}));
        assert_eq!(resp.status, 200, "round {round}: {}", resp.text());
        let id = resp.json()["run_id"].as_str().unwrap().to_string();
        let record = server.run_record(&id, &token);
        assert_eq!(
            record["status"],
            json!("succeeded"),
            "round {round}: the record right after the result: {record}"
        );
    }
}

/// Calls `next` with the RUNBOOK_H_* headers, passing GATE on.
fn calling(next: &str) -> String {
    format!(
        "echo \"calling {next}\" >&2\n\
         curl -s -X POST \"$RUNBOOK_URL/{next}/execute\" -H \"$RUNBOOK_H_AUTH\" -H \"$RUNBOOK_H_CORR\" \
         -H \"$RUNBOOK_H_RECUR\" -H \"$RUNBOOK_H_CTYPE\" -d \"{{\\\"env_vars\\\":{{\\\"GATE\\\":\\\"$GATE\\\"}}}}\"\n"
    )
}

#[test]
#[ignore = "needs curl; CI runs it"]
fn a_three_deep_sub_runbook_chain_completes_at_the_limit() {
    need_program("curl");
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "A.md",
                Runbook::new("A", &calling("B.md")).env("GATE", "gate"),
            )
            .runbook(
                "B.md",
                Runbook::new("B", &calling("C.md")).env("GATE", "gate"),
            )
            .runbook(
                "C.md",
                Runbook::new(
                    "C",
                    &format!("echo 'C ran'\n{}echo 'C done'\n", wait_for_gate("GATE")),
                )
                .env("GATE", "gate"),
            )
            .runbook("Quick.md", Runbook::new("Quick", "echo quick\n"))
            .env("MAX_CONCURRENT_RUNS", "1"),
    );
    let token = dev_token();
    let gate = Gate::new(&server.root, "chain");
    let a = server.start_run("A.md", &token, json!({"GATE": gate.path()}));
    assert!(
        wait_until(RUN_TIMEOUT, || server
            .list_runs("?status=running", &token)
            .len()
            == 3),
        "A, B and C should run at once: {:?}",
        server.list_runs("", &token)
    );
    let running: Vec<String> = server
        .list_runs("?status=running", &token)
        .iter()
        .map(|r| r["runbook"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(running, vec!["C.md", "B.md", "A.md"]);
    // The limit holds for everyone else meanwhile.
    let other = server.execute("Quick.md", &token, json!({}));
    assert_eq!(other.status, 429, "{}", other.text());

    gate.open();
    let record = server.wait_finished(&a, &token, RUN_TIMEOUT);
    assert_eq!(record["status"], json!("succeeded"), "{record}");
    let download = server.call(
        "GET",
        &format!("/api/runs/{a}/logs/download?stream=stdout"),
        Some(&token),
        &[],
        None,
    );
    let a_result = json!({"stdout": download.text()});
    let b_result = stdout_json(&a_result);
    assert_eq!(b_result["success"], json!(true), "{b_result}");
    let c_result = stdout_json(&b_result);
    assert_eq!(c_result["success"], json!(true), "{c_result}");
    assert_eq!(c_result["stdout"], json!("C ran\nC done\n"), "{c_result}");
    assert!(server.list_runs("?status=running", &token).is_empty());
    let after = server.execute_when_admitted("Quick.md", "", &token, json!({}), &[]);
    assert_eq!(after.status, 200, "{}", after.text());
}

#[test]
fn the_concurrency_block_limits_runs_of_one_runbook() {
    let server = Server::start(
        ServerOpts::new()
            .file("Solo.md", with_concurrency(&gated("Solo"), 1).as_bytes())
            .file("Duo.md", with_concurrency(&gated("Duo"), 2).as_bytes())
            .runbook("Other.md", gated("Other")),
    );
    let token = dev_token();
    let gate = Gate::new(&server.root, "solo");
    let env = json!({"GATE": gate.path()});
    let solo = server.start_run("Solo.md", &token, env.clone());

    for (query, extra) in [
        ("", vec![]),
        ("?async=true", vec![]),
        ("", vec![("Accept", "text/event-stream")]),
    ] {
        let resp = server.execute_raw("Solo.md", query, &token, env.clone(), &extra);
        assert_eq!(resp.status, 409, "{query} {extra:?}: {}", resp.text());
        let body = resp.json();
        assert_eq!(body["success"], json!(false), "{body}");
        assert_eq!(body["run_ids"], json!([solo]), "{body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    // Other runbooks are not held up.
    let other = server.start_run("Other.md", &token, env.clone());
    let duo1 = server.start_run("Duo.md", &token, env.clone());
    let duo2 = server.start_run("Duo.md", &token, env.clone());
    let resp = server.execute_raw("Duo.md", "", &token, env.clone(), &[]);
    assert_eq!(resp.status, 409, "{}", resp.text());
    let held: BTreeSet<String> = resp.json()["run_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(held, BTreeSet::from([duo1.clone(), duo2.clone()]));
    assert_eq!(server.list_runs("?runbook=Solo.md", &token).len(), 1);

    gate.open();
    for id in [&solo, &other, &duo1, &duo2] {
        assert_eq!(
            server.wait_finished(id, &token, RUN_TIMEOUT)["status"],
            json!("succeeded")
        );
    }
    let again = server.execute_when_admitted("Solo.md", "", &token, env, &[]);
    assert_eq!(again.status, 200, "{}", again.text());
}

#[test]
fn kill_9_mid_run_then_restart_marks_it_interrupted() {
    // The background job beats (rewrites a file) until it is killed: a beat after the server's
    // death proves the group outlived it.
    let crashing = "echo \"pgid=$$\"\necho 'before the crash'\necho 'on stderr' >&2\n\
                    (n=0; while :; do n=$((n + 1)); echo $n > \"$BEAT\"; sleep 0.05; done) &\n\
                    sleep 100\n";
    let beat_dir = unique_root();
    let beat = beat_dir.join("beat");
    let mut daemon = Daemon::start(
        &[
            (
                "Crash.md",
                Runbook::new("Crash", crashing)
                    .env("BEAT", "heartbeat file")
                    .render(),
            ),
            ("Quick.md", Runbook::new("Quick", "echo quick\n").render()),
        ],
        &[],
    );
    let token = dev_token();
    let quick = daemon.execute_raw("Quick.md", "", &token, json!({}), &[]);
    assert_eq!(quick.status, 200);
    let quick_id = quick.json()["run_id"].as_str().unwrap().to_string();
    let id = daemon.start_run(
        "Crash.md",
        &token,
        json!({ "BEAT": beat.display().to_string() }),
    );
    daemon.wait_output(&id, &token, "stderr", "its line", &|t| t == "on stderr\n");
    let stdout = daemon.wait_output(&id, &token, "stdout", "two lines", &|t| {
        t.ends_with("before the crash\n")
    });
    let pgid = number_after(&stdout, "pgid=");
    let _guard = GroupGuard(pgid);
    assert_eq!(stdout, format!("pgid={pgid}\nbefore the crash\n"));
    assert!(wait_until(Duration::from_secs(10), || group_members(pgid)
        .len()
        >= 3));

    daemon.kill9();
    // The record and the log are on disk; the orphaned group lives on.
    let on_disk: Value =
        serde_json::from_slice(&fs::read(daemon.runs_dir().join(format!("{id}.json"))).unwrap())
            .unwrap();
    assert_eq!(on_disk["status"], json!("running"), "{on_disk}");
    assert!(daemon.runs_dir().join(format!("{id}.log")).is_file());
    let at_death = fs::read_to_string(&beat).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(10), || fs::read_to_string(&beat)
            .is_ok_and(|now| !now.is_empty() && now != at_death)),
        "the script's group should outlive a killed server (no beat after its death)"
    );
    assert!(
        !group_members(pgid).is_empty(),
        "the script's group should outlive a killed server"
    );

    let crash_md = daemon.runbooks_dir().join("Crash.md");
    assert!(
        history_entries(&fs::read_to_string(&crash_md).unwrap()).is_empty(),
        "no history before the restart"
    );
    daemon.restart(&[]);
    let record = daemon.run_record(&id, &token);
    assert_eq!(record["status"], json!("interrupted"), "{record}");
    assert_eq!(record["return_code"], json!(-1), "{record}");
    // The restart wrote the history entry the killed server could not: what the log holds,
    // and why the run ended.
    let entries = history_entries(&fs::read_to_string(&crash_md).unwrap());
    assert_eq!(entries.len(), 1, "{entries:?}");
    let (_, exit_code, run) = entry_header(&entries[0]);
    assert_eq!((exit_code, run.as_deref()), (-1, Some(id.as_str())));
    assert!(
        entries[0].contains(&format!("**Stdout:**\n```\n{stdout}```")),
        "{}",
        entries[0]
    );
    assert!(
        entries[0].contains(
            "**Stderr:**\n```\non stderr\nrunbookd: the server stopped while the run was going\n```"
        ),
        "{}",
        entries[0]
    );
    assert!(record["finished_at"].is_string(), "{record}");
    assert_eq!(record["stdout_bytes"], json!(stdout.len()), "{record}");
    assert_eq!(record["stderr_bytes"], json!(10), "{record}");
    assert!(
        wait_until(Duration::from_secs(5), || group_members(pgid).is_empty()),
        "the orphaned group {pgid} was not killed: {:?}",
        group_members(pgid)
    );
    assert_eq!(
        daemon.run_record(&quick_id, &token)["status"],
        json!("succeeded"),
        "a finished run stays as it was"
    );
    assert_eq!(
        run_ids_of(&daemon.list_runs("?status=interrupted", &token)),
        BTreeSet::from([id.clone()])
    );

    // Its log is served as far as it was written.
    let events = daemon.attach(&id, &token, "", None).until_end(RUN_TIMEOUT);
    assert_eq!(joined(&events, "stdout"), stdout);
    assert_eq!(joined(&events, "stderr"), "on stderr\n");
    let done = events.last().unwrap();
    assert_eq!(done.event, "done");
    let mut at_done =
        daemon.open_events(&id, Some(&token), "", Some(&done.numeric_id().to_string()));
    assert_eq!(at_done.status, 204);
    assert!(at_done.read_all(Duration::from_secs(5)).is_empty());
    let both = daemon.call(
        "GET",
        &format!("/api/runs/{id}/logs/download"),
        Some(&token),
        &[],
        None,
    );
    assert_eq!(both.status, 200);
    assert_eq!(both.body.len(), stdout.len() + 10);
    let both_text = both.text();
    assert!(both_text.contains("before the crash\n") && both_text.contains("on stderr\n"));
    let stderr_only = daemon.call(
        "GET",
        &format!("/api/runs/{id}/logs/download?stream=stderr&access_token={token}"),
        None,
        &[],
        None,
    );
    assert_eq!(stderr_only.body, b"on stderr\n");

    // The restarted server runs new work.
    let again = daemon.execute_raw("Quick.md", "", &token, json!({}), &[]);
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(daemon.cancel(&id, &token).status, 409);
    let _ = fs::remove_dir_all(&beat_dir);
}

fn run_files(daemon: &Daemon, id: &str) -> [bool; 2] {
    [
        daemon.runs_dir().join(format!("{id}.json")).is_file(),
        daemon.runs_dir().join(format!("{id}.log")).is_file(),
    ]
}

#[test]
fn retention_prunes_by_count_and_age_at_start() {
    let mut daemon = Daemon::start(
        &[("Quick.md", Runbook::new("Quick", "echo quick\n").render())],
        &[],
    );
    let token = dev_token();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let resp = daemon.execute_raw("Quick.md", "", &token, json!({}), &[]);
        assert_eq!(resp.status, 200);
        ids.push(resp.json()["run_id"].as_str().unwrap().to_string());
        thread::sleep(Duration::from_millis(10));
    }
    for id in &ids {
        assert_eq!(run_files(&daemon, id), [true, true], "{id}");
    }

    daemon.kill9();
    daemon.restart(&[("RUN_RETENTION_COUNT", "2")]);
    let left: Vec<String> = daemon
        .list_runs("", &token)
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        left,
        vec![ids[3].clone(), ids[2].clone()],
        "the two newest stay"
    );
    for id in &ids[..2] {
        assert_eq!(run_files(&daemon, id), [false, false], "{id} pruned");
        let resp = daemon.call("GET", &format!("/api/runs/{id}"), Some(&token), &[], None);
        assert_eq!(resp.status, 404);
    }
    for id in &ids[2..] {
        assert_eq!(run_files(&daemon, id), [true, true], "{id} kept");
    }

    // Age: a run that started 40 days ago goes at the next start.
    daemon.kill9();
    let path = daemon.runs_dir().join(format!("{}.json", ids[2]));
    let mut record: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    let old = chrono::Utc::now() - chrono::Duration::days(40);
    record["started_at"] = json!(old.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    record["finished_at"] =
        json!((old + chrono::Duration::seconds(1))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    fs::write(&path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();
    daemon.restart(&[("RUN_RETENTION_DAYS", "30")]);
    assert_eq!(
        run_ids_of(&daemon.list_runs("", &token)),
        BTreeSet::from([ids[3].clone()])
    );
    assert_eq!(run_files(&daemon, &ids[2]), [false, false]);
    assert_eq!(run_files(&daemon, &ids[3]), [true, true]);
}

#[test]
fn retention_keeps_state_under_state_max_bytes() {
    let mut daemon = Daemon::start(
        &[(
            "Big.md",
            Runbook::new("Big", "head -c 20000 /dev/zero | tr '\\0' 'x'\n").render(),
        )],
        &[],
    );
    let token = dev_token();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let resp = daemon.execute_raw("Big.md", "", &token, json!({}), &[]);
        assert_eq!(resp.status, 200);
        ids.push(resp.json()["run_id"].as_str().unwrap().to_string());
        thread::sleep(Duration::from_millis(10));
    }
    daemon.kill9();
    let size = |id: &str| -> u64 {
        ["json", "log"]
            .iter()
            .map(|ext| {
                fs::metadata(daemon.runs_dir().join(format!("{id}.{ext}")))
                    .unwrap()
                    .len()
            })
            .sum()
    };
    assert!(size(&ids[0]) > 20000);
    let limit = size(&ids[1]) + size(&ids[2]) + 100;
    daemon.restart(&[("STATE_MAX_BYTES", &limit.to_string())]);
    assert_eq!(
        run_ids_of(&daemon.list_runs("", &token)),
        BTreeSet::from([ids[1].clone(), ids[2].clone()]),
        "the oldest run goes first (limit {limit})"
    );
    assert_eq!(run_files(&daemon, &ids[0]), [false, false]);
}

#[test]
fn sigterm_stops_running_runs_and_exits_zero_within_the_grace() {
    let mut daemon = Daemon::start(
        &[("Stubborn.md", Runbook::new("Stubborn", STUBBORN).render())],
        &[("SHUTDOWN_GRACE_SECONDS", "3")],
    );
    let token = dev_token();
    let id = daemon.start_run("Stubborn.md", &token, json!({}));
    let mut viewer = daemon.attach(&id, &token, "", None);
    let (pgid, _guard) = watched_group(&mut viewer, 3);

    let t = Instant::now();
    daemon.sigterm();
    let status = daemon.wait_exit(Duration::from_secs(15));
    let took = t.elapsed();
    let status = status.expect("the server did not exit within 15 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    // Loose: the point is that the 3 s grace bounds the shutdown (the script would run 100 s).
    assert!(
        took <= Duration::from_secs(11),
        "exited {took:?} after SIGTERM, SHUTDOWN_GRACE_SECONDS is 3"
    );
    assert!(
        group_members(pgid).is_empty(),
        "the run's group survived the shutdown: {:?}",
        group_members(pgid)
    );
    // The attached viewer got its done.
    let events = viewer.until_done(Duration::from_secs(5));
    assert_eq!(events.last().unwrap().event, "done");
    // The record says interrupted, and history was written.
    let on_disk: Value =
        serde_json::from_slice(&fs::read(daemon.runs_dir().join(format!("{id}.json"))).unwrap())
            .unwrap();
    assert_eq!(on_disk["status"], json!("interrupted"), "{on_disk}");
    let markdown = fs::read_to_string(daemon.runbooks_dir().join("Stubborn.md")).unwrap();
    let entries = history_entries(&markdown);
    assert!(
        entries
            .iter()
            .any(|e| entry_header(e).2.as_deref() == Some(id.as_str())),
        "no history entry for {id}: {markdown}"
    );

    daemon.restart(&[]);
    let record = daemon.run_record(&id, &token);
    assert_eq!(record["status"], json!("interrupted"), "{record}");
    // The shutdown settled the run: the restart adds no second history entry.
    let markdown = fs::read_to_string(daemon.runbooks_dir().join("Stubborn.md")).unwrap();
    let for_this_run = history_entries(&markdown)
        .iter()
        .filter(|e| entry_header(e).2.as_deref() == Some(id.as_str()))
        .count();
    assert_eq!(for_this_run, 1, "{markdown}");
    let replay = daemon.attach(&id, &token, "", None).until_end(RUN_TIMEOUT);
    assert_eq!(joined(&replay, "stdout"), format!("pgid={pgid}\n"));
}

#[test]
fn sigterm_with_a_cooperative_run_exits_quickly() {
    let mut daemon = Daemon::start(
        &[(
            "Sleepy.md",
            Runbook::new("Sleepy", "echo \"pgid=$$\"\nsleep 100\n").render(),
        )],
        &[("SHUTDOWN_GRACE_SECONDS", "20")],
    );
    let token = dev_token();
    let mut sse = daemon.execute_stream("Sleepy.md", &token);
    let id = sse.resp.header("X-Run-Id").unwrap().to_string();
    let (pgid, _guard) = watched_group(&mut sse, 1);

    let t = Instant::now();
    daemon.sigterm();
    let status = daemon
        .wait_exit(Duration::from_secs(30))
        .expect("no exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(14),
        "a run that obeys TERM held the shutdown (grace 20 s) for {:?}",
        t.elapsed()
    );
    assert!(group_members(pgid).is_empty());
    let events = sse.until_done(Duration::from_secs(5));
    assert_eq!(events.last().unwrap().event, "done");
    let on_disk: Value =
        serde_json::from_slice(&fs::read(daemon.runs_dir().join(format!("{id}.json"))).unwrap())
            .unwrap();
    assert_eq!(on_disk["status"], json!("interrupted"), "{on_disk}");
}
