//! Runs as objects: the run id in every execute answer, starting without waiting, the run
//! records and their listing with filters, who may see a run, the numbered log lines with
//! levels and filters, and the raw download (also with the token in the query).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::runs_support::*;
use crate::util::*;

/// The fields of a run record in the API.
const RECORD_FIELDS: [&str; 14] = [
    "run_id",
    "runbook",
    "status",
    "user",
    "started_at",
    "finished_at",
    "duration_ms",
    "return_code",
    "stdout_bytes",
    "stderr_bytes",
    "truncated",
    "errors",
    "warnings",
    "script_started",
];

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn time(v: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    let text = v
        .as_str()
        .unwrap_or_else(|| panic!("not a time string: {v}"));
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}"))
}

/// `<instance>-<uuid v4>`.
fn assert_run_id_shape(id: &str, instance: &str) {
    let uuid = id
        .strip_prefix(&format!("{instance}-"))
        .unwrap_or_else(|| panic!("run id {id:?} does not start with {instance}-"));
    let groups: Vec<&str> = uuid.split('-').collect();
    assert_eq!(
        groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
        vec![8, 4, 4, 4, 12],
        "{id}"
    );
    assert!(
        uuid.chars()
            .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "{id}"
    );
    assert!(groups[2].starts_with('4'), "not a version 4 uuid: {id}");
}

fn ids(runs: &[Value]) -> Vec<String> {
    runs.iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_execute_answer_names_its_run() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Hello.md",
                Runbook::new("Hello", "echo hello\necho oops >&2\n"),
            )
            .env("INSTANCE_ID", "node7"),
    );
    let token = dev_token();

    // SSE: `event: run` (no id) first, and the X-Run-Id header.
    let mut sse = server.execute_sse("Hello.md", &token, json!({}));
    let header_id = sse
        .resp
        .header("X-Run-Id")
        .expect("X-Run-Id header on the SSE execute")
        .to_string();
    let events = sse.until_end(RUN_TIMEOUT);
    let first = &events[0];
    assert_eq!(first.event, "run", "first event: {events:?}");
    assert_eq!(first.id, None, "the run event carries no id: {first:?}");
    let announced = first.json();
    assert_eq!(announced["run_id"], json!(header_id), "{announced}");
    assert_eq!(announced["runbook"], json!("Hello.md"), "{announced}");
    assert_run_id_shape(&header_id, "node7");
    assert_eq!(done_json(&events)["run_id"], json!(header_id));
    assert_eq!(
        events.iter().filter(|e| e.event == "run").count(),
        1,
        "{events:?}"
    );

    // Sync JSON.
    let sync = server.execute("Hello.md", &token, json!({}));
    assert_eq!(sync.status, 200, "{}", sync.text());
    let sync_id = sync.json()["run_id"].as_str().unwrap().to_string();
    assert_run_id_shape(&sync_id, "node7");
    assert_ne!(sync_id, header_id);

    // Without waiting: ?async=true wins over Accept, and Prefer: respond-async.
    let mut async_ids = Vec::new();
    for (query, extra) in [
        ("?async=true", vec![("Accept", "text/event-stream")]),
        ("", vec![("Prefer", "respond-async")]),
    ] {
        let resp = server.execute_raw("Hello.md", query, &token, json!({}), &extra);
        assert_eq!(resp.status, 202, "{query} {extra:?}: {}", resp.text());
        assert!(
            resp.header("Content-Type")
                .is_some_and(|c| c.contains("application/json")),
            "{:?}",
            resp.headers
        );
        let body = resp.json();
        let id = body["run_id"].as_str().unwrap().to_string();
        assert_run_id_shape(&id, "node7");
        assert_eq!(
            body,
            json!({"success": true, "run_id": id, "runbook": "Hello.md", "status": "running"})
        );
        assert_eq!(
            resp.header("Location"),
            Some(format!("/api/runs/{id}").as_str())
        );
        async_ids.push(id);
    }
    for id in &async_ids {
        let record = server.wait_finished(id, &token, RUN_TIMEOUT);
        assert_eq!(record["status"], json!("succeeded"), "{record}");
        assert_eq!(record["stdout_bytes"], json!(6), "{record}");
        assert_eq!(record["stderr_bytes"], json!(5), "{record}");
    }
    let listed: BTreeSet<String> = ids(&server.list_runs("", &token)).into_iter().collect();
    let expected: BTreeSet<String> = [header_id, sync_id].into_iter().chain(async_ids).collect();
    assert_eq!(listed, expected);
}

#[test]
fn records_are_listed_newest_first_and_filtered() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Fast.md",
                Runbook::new("Fast", "echo fast\nprintf 'err\\n' >&2\n"),
            )
            .runbook("Fail.md", Runbook::new("Fail", "echo failing\nexit 3\n"))
            .runbook(
                "Wait.md",
                Runbook::new("Wait", &format!("{}echo waited\n", wait_for_gate("GATE")))
                    .env("GATE", "gate file"),
            ),
    );
    let alice = token("alice", &["developer"]);
    let gate = Gate::new(&server.root, "wait");

    let run = |file: &str, expect: u16| {
        let resp = server.execute(file, &alice, json!({}));
        assert_eq!(resp.status, expect, "{file}: {}", resp.text());
        resp.json()["run_id"].as_str().unwrap().to_string()
    };
    let r1 = run("Fast.md", 200);
    let r2 = run("Fail.md", 500);
    let r3 = run("Fast.md", 200);
    std::thread::sleep(Duration::from_millis(20));
    let r4 = server.start_run("Wait.md", &alice, json!({"GATE": gate.path()}));

    let all = server.list_runs("", &alice);
    assert_eq!(
        ids(&all),
        [&r4, &r3, &r2, &r1].map(String::clone),
        "newest first"
    );
    let expected_keys: BTreeSet<String> = RECORD_FIELDS.iter().map(|s| s.to_string()).collect();
    for record in &all {
        assert_eq!(keys(record), expected_keys, "{record}");
    }

    for (query, expected) in [
        ("?runbook=Fast.md", vec![&r3, &r1]),
        ("?status=failed", vec![&r2]),
        ("?status=running", vec![&r4]),
        ("?status=succeeded&runbook=Fast.md", vec![&r3, &r1]),
        ("?runbook=Fail.md&status=succeeded", vec![]),
        ("?limit=2", vec![&r4, &r3]),
        ("?limit=1&runbook=Fast.md", vec![&r3]),
        ("?runbook=Nope.md", vec![]),
    ] {
        let expected: Vec<String> = expected.into_iter().cloned().collect();
        assert_eq!(ids(&server.list_runs(query, &alice)), expected, "{query}");
    }

    // A failed run's record.
    let failed = server.run_record(&r2, &alice);
    assert_eq!(failed["success"], json!(true), "{failed}");
    assert_eq!(failed["run_id"], json!(r2));
    assert_eq!(failed["runbook"], json!("Fail.md"));
    assert_eq!(failed["status"], json!("failed"));
    assert_eq!(failed["user"], json!("alice"));
    assert_eq!(failed["return_code"], json!(3));
    assert_eq!(failed["stdout_bytes"], json!("failing\n".len()));
    assert_eq!(failed["stderr_bytes"], json!(0));
    assert_eq!(failed["truncated"], json!(false));
    let started = time(&failed["started_at"]);
    let finished = time(&failed["finished_at"]);
    assert!(finished >= started, "{failed}");
    let duration = failed["duration_ms"].as_u64().expect("duration_ms");
    let span = (finished - started).num_milliseconds();
    assert!(
        (duration as i64 - span).abs() <= 1000,
        "duration_ms {duration} vs finished - started {span}"
    );

    let fast = server.run_record(&r1, &alice);
    assert_eq!(fast["status"], json!("succeeded"));
    assert_eq!(fast["return_code"], json!(0));
    assert_eq!(fast["stdout_bytes"], json!(5));
    assert_eq!(fast["stderr_bytes"], json!(4));

    // A running run's record.
    let running = server.run_record(&r4, &alice);
    assert_eq!(running["status"], json!("running"), "{running}");
    assert_eq!(running["finished_at"], Value::Null, "{running}");
    assert_eq!(running["duration_ms"], Value::Null, "{running}");
    assert_eq!(running["return_code"], Value::Null, "{running}");
    assert!(time(&running["started_at"]) >= time(&fast["started_at"]));

    gate.open();
    let done = server.wait_finished(&r4, &alice, RUN_TIMEOUT);
    assert_eq!(done["status"], json!("succeeded"), "{done}");
    assert_eq!(done["stdout_bytes"], json!("waited\n".len()));
    assert!(server.list_runs("?status=running", &alice).is_empty());
}

#[test]
fn unknown_and_malformed_run_ids_are_404() {
    let server =
        Server::start(ServerOpts::new().runbook("Hello.md", Runbook::new("Hello", "echo hello\n")));
    let token = dev_token();
    let real = server.execute("Hello.md", &token, json!({})).json()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let unknown = "r1-6748da90-c3f7-497f-b29a-eabb74191959";
    for id in [
        unknown,
        "nope",
        "r1-123",
        "r1-6748da90c3f7497fb29aeabb74191959",
        "..%2F..%2Fetc%2Fpasswd",
        "r1-..%2Fx",
        &real[..real.len() - 1],
    ] {
        for (method, suffix) in [
            ("GET", ""),
            ("GET", "/events"),
            ("GET", "/logs"),
            ("GET", "/logs/download"),
            ("DELETE", ""),
        ] {
            let resp = server.call(
                method,
                &format!("/api/runs/{id}{suffix}"),
                Some(&token),
                &[],
                None,
            );
            assert_eq!(resp.status, 404, "{method} {id}{suffix}: {}", resp.text());
            assert_eq!(resp.json()["success"], json!(false));
        }
    }
    // The routes need a token.
    for path in [
        "/api/runs".to_string(),
        format!("/api/runs/{real}"),
        format!("/api/runs/{real}/logs"),
        format!("/api/runs/{real}/events"),
        format!("/api/runs/{real}/logs/download"),
    ] {
        assert_eq!(
            server.call("GET", &path, None, &[], None).status,
            401,
            "{path}"
        );
    }
    assert_eq!(
        server.run_record(&real, &token)["status"],
        json!("succeeded")
    );
}

#[test]
fn scripts_past_their_timeout_are_recorded_as_timed_out() {
    let server = Server::start(
        ServerOpts::new()
            .runbook("Slow.md", Runbook::new("Slow", "echo start\nsleep 30\n"))
            .env("SCRIPT_TIMEOUT_SECONDS", "1"),
    );
    let token = dev_token();
    let resp = server.execute("Slow.md", &token, json!({}));
    assert_eq!(resp.status, 500, "{}", resp.text());
    let id = resp.json()["run_id"].as_str().unwrap().to_string();
    let record = server.run_record(&id, &token);
    assert_eq!(record["status"], json!("timed_out"), "{record}");
    assert_eq!(
        ids(&server.list_runs("?status=timed_out", &token)),
        vec![id]
    );
}

#[test]
fn only_the_owner_and_holders_of_the_required_claims_see_a_run() {
    let script = format!("echo ops output\n{}echo ops done\n", wait_for_gate("GATE"));
    let server = Server::start(
        ServerOpts::new().runbook(
            "Ops.md",
            Runbook::new("Ops", &script)
                .env("GATE", "gate file")
                .claim("roles: ops, admin"),
        ),
    );
    let alice = token("alice", &["ops"]);
    let alice_without_claims = token("alice", &["developer"]);
    let bob = token("bob", &["developer"]);
    let carol = token("carol", &["admin"]);
    let gate = Gate::new(&server.root, "ops");
    let id = server.start_run("Ops.md", &alice, json!({"GATE": gate.path()}));
    server.wait_output(&id, &alice, "stdout", "its first line", &|t| !t.is_empty());

    let paths = [
        format!("/api/runs/{id}"),
        format!("/api/runs/{id}/logs"),
        format!("/api/runs/{id}/logs/download"),
    ];
    // Another user without the claims: 403 everywhere, even while it runs; cannot cancel.
    for path in &paths {
        let resp = server.call("GET", path, Some(&bob), &[], None);
        assert_eq!(resp.status, 403, "bob {path}: {}", resp.text());
        assert_eq!(resp.json()["success"], json!(false));
    }
    assert_eq!(server.open_events(&id, Some(&bob), "", None).status, 403);
    assert_eq!(
        server
            .open_events(&id, None, &format!("?access_token={bob}"), None)
            .status,
        403
    );
    let cancel = server.cancel(&id, &bob);
    assert_eq!(cancel.status, 403, "{}", cancel.text());
    assert!(server.list_runs("", &bob).is_empty());
    assert_eq!(server.run_record(&id, &alice)["status"], json!("running"));

    // The owner (also with other roles now) and a holder of the claims see it.
    for (who, tok) in [
        ("alice", &alice),
        ("alice without the claims", &alice_without_claims),
        ("carol", &carol),
    ] {
        for path in &paths {
            let resp = server.call("GET", path, Some(tok), &[], None);
            assert_eq!(resp.status, 200, "{who} {path}: {}", resp.text());
        }
        assert_eq!(ids(&server.list_runs("", tok)), vec![id.clone()], "{who}");
        let mut sse = server.attach(&id, tok, "", None);
        let first = sse.next_event(Duration::from_secs(20)).expect("an event");
        assert_eq!(first.data, "ops output\n", "{who}");
    }

    // An administrator (ADMIN_ROLES) who holds the claims may cancel.
    let cancel = server.cancel(&id, &carol);
    assert_eq!(cancel.status, 202, "{}", cancel.text());
    let record = server.wait_finished(&id, &alice, RUN_TIMEOUT);
    assert_eq!(record["status"], json!("cancelled"), "{record}");
    assert_eq!(record["user"], json!("alice"));
    // Finished runs stay private too.
    assert_eq!(
        server.call("GET", &paths[0], Some(&bob), &[], None).status,
        403
    );
}

/// The lines of a `/logs` answer as `(line, stream, level, text)`.
fn lines_of(body: &Value) -> Vec<(u64, String, String, String)> {
    body["logs"]
        .as_array()
        .unwrap_or_else(|| panic!("no logs list: {body}"))
        .iter()
        .map(|l| {
            (
                l["line"].as_u64().unwrap(),
                l["stream"].as_str().unwrap().to_string(),
                l["level"].as_str().unwrap().to_string(),
                l["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn log_lines_have_numbers_levels_and_filters() {
    let script = format!(
        "echo 'starting up'\nsleep 0.15\n\
         echo 'an ERROR happened'\nsleep 0.15\n\
         echo 'Warn: disk almost full' >&2\nsleep 0.15\n\
         echo 'plain complaint' >&2\nsleep 0.15\n\
         echo 'DEBUG details and info'\nsleep 0.15\n\
         echo 'info: then an error'\nsleep 0.15\n\
         echo 'errors and warnings are not the words'\nsleep 0.15\n\
         echo 'just info' >&2\nsleep 0.15\n\
         {}printf 'no newline at the end'\n",
        wait_for_gate("GATE")
    );
    let (server, token, gate, id) = start_gated_run(ServerOpts::new(), "Lines", &script);
    let logs = |query: &str| server.run_logs(&id, &token, query);

    let s = |t: &str| t.to_string();
    let all_lines = vec![
        (1, s("stdout"), s("INFO"), s("starting up")),
        (2, s("stdout"), s("ERROR"), s("an ERROR happened")),
        (3, s("stderr"), s("WARNING"), s("Warn: disk almost full")),
        (4, s("stderr"), s("WARNING"), s("plain complaint")),
        (5, s("stdout"), s("DEBUG"), s("DEBUG details and info")),
        (6, s("stdout"), s("ERROR"), s("info: then an error")),
        (
            7,
            s("stdout"),
            s("INFO"),
            s("errors and warnings are not the words"),
        ),
        (8, s("stderr"), s("INFO"), s("just info")),
        (9, s("stdout"), s("INFO"), s("no newline at the end")),
    ];

    // Readable while the run goes on.
    assert!(wait_until(RUN_TIMEOUT, || lines_of(&logs("")).len() == 8));
    assert_eq!(lines_of(&logs("")), all_lines[..8].to_vec());
    assert_eq!(server.run_record(&id, &token)["status"], json!("running"));

    gate.open();
    server.wait_finished(&id, &token, RUN_TIMEOUT);
    let body = logs("");
    assert_eq!(lines_of(&body), all_lines, "{body}");
    assert_eq!(body["truncated"], json!(false));
    let times: Vec<_> = body["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| time(&l["time"]))
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "lines written 150 ms apart have increasing times: {times:?}"
    );

    let pick = |numbers: &[u64]| -> Vec<(u64, String, String, String)> {
        all_lines
            .iter()
            .filter(|l| numbers.contains(&l.0))
            .cloned()
            .collect()
    };
    for (query, numbers, truncated) in [
        ("?stream=stderr", vec![3, 4, 8], false),
        ("?stream=stdout", vec![1, 2, 5, 6, 7, 9], false),
        ("?tail=2", vec![8, 9], true),
        ("?tail=9", vec![1, 2, 3, 4, 5, 6, 7, 8, 9], false),
        ("?tail=100", vec![1, 2, 3, 4, 5, 6, 7, 8, 9], false),
        ("?tail=2&stream=stdout", vec![7, 9], true),
        ("?tail=1&stream=stderr", vec![8], true),
    ] {
        let body = logs(query);
        assert_eq!(lines_of(&body), pick(&numbers), "{query}");
        assert_eq!(body["truncated"], json!(truncated), "{query}");
    }

    // since is exclusive.
    let fifth = body["logs"][4]["time"].as_str().unwrap().to_string();
    let after_fifth = logs(&format!("?since={fifth}"));
    assert_eq!(lines_of(&after_fifth), pick(&[6, 7, 8, 9]), "since {fifth}");
    let after_fifth_stderr = logs(&format!("?since={fifth}&stream=stderr"));
    assert_eq!(lines_of(&after_fifth_stderr), pick(&[8]));
    let last = body["logs"][8]["time"].as_str().unwrap().to_string();
    assert!(lines_of(&logs(&format!("?since={last}"))).is_empty());

    for bad in ["?since=yesterday", "?stream=both", "?tail=many"] {
        let resp = server.call(
            "GET",
            &format!("/api/runs/{id}/logs{bad}"),
            Some(&token),
            &[],
            None,
        );
        assert_eq!(resp.status, 400, "{bad}: {}", resp.text());
    }
}

#[test]
fn download_gives_the_raw_interleaved_bytes() {
    let script = "printf 'out-1\\n'\nsleep 0.1\nprintf 'err-1\\n' >&2\nsleep 0.1\n\
                  printf 'out-2 \\377 caf\\303\\251\\r\\n'\nsleep 0.1\nprintf 'err-2' >&2\nsleep 0.1\n\
                  printf 'out-3\\n'\n";
    let server = Server::start(ServerOpts::new().runbook("Raw.md", Runbook::new("Raw", script)));
    let token = dev_token();
    let resp = server.execute("Raw.md", &token, json!({}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let id = resp.json()["run_id"].as_str().unwrap().to_string();
    let stdout: &[u8] = b"out-1\nout-2 \xff caf\xc3\xa9\r\nout-3\n";
    let stderr: &[u8] = b"err-1\nerr-2";
    let both: &[u8] = b"out-1\nerr-1\nout-2 \xff caf\xc3\xa9\r\nerr-2out-3\n";

    for (query, expected) in [
        ("", both),
        ("?stream=stdout", stdout),
        ("?stream=stderr", stderr),
    ] {
        let resp = server.call(
            "GET",
            &format!("/api/runs/{id}/logs/download{query}"),
            Some(&token),
            &[],
            None,
        );
        assert_eq!(resp.status, 200, "{query}: {}", resp.text());
        assert_eq!(
            resp.body,
            expected,
            "{query}: {:?}",
            String::from_utf8_lossy(&resp.body)
        );
        assert!(
            resp.header("Content-Type")
                .is_some_and(|c| c.starts_with("text/plain")),
            "{:?}",
            resp.headers
        );
        let disposition = resp.header("Content-Disposition").unwrap_or_default();
        assert!(
            disposition.starts_with("attachment"),
            "{query}: Content-Disposition {disposition:?}"
        );
    }
    let bad = server.call(
        "GET",
        &format!("/api/runs/{id}/logs/download?stream=all"),
        Some(&token),
        &[],
        None,
    );
    assert_eq!(bad.status, 400, "{}", bad.text());

    // The replay carries the same output, lossily decoded with CR normalised.
    let events = server.attach(&id, &token, "", None).until_end(RUN_TIMEOUT);
    assert_eq!(joined(&events, "stdout"), normalise(stdout));
    assert_eq!(joined(&events, "stderr"), normalise(stderr));
}

#[test]
fn access_token_in_the_query_works_for_events_and_download_only() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Hello.md",
                Runbook::new("Hello", "echo hello\nsleep 0.1\necho oops >&2\n"),
            )
            .env("RUST_LOG", "debug"),
    );
    let token = dev_token();
    let id = server.execute("Hello.md", &token, json!({})).json()["run_id"]
        .as_str()
        .unwrap()
        .to_string();

    let download = |query: &str| {
        server.call(
            "GET",
            &format!("/api/runs/{id}/logs/download{query}"),
            None,
            &[],
            None,
        )
    };
    let ok = download(&format!("?access_token={token}"));
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.body, b"hello\noops\n");
    let stderr_only = download(&format!("?stream=stderr&access_token={token}"));
    assert_eq!(stderr_only.status, 200);
    assert_eq!(stderr_only.body, b"oops\n");
    let missing = download("");
    assert_eq!(missing.status, 401, "{}", missing.text());
    assert!(
        missing
            .header("WWW-Authenticate")
            .is_some_and(|w| w.starts_with("Bearer")),
        "{:?}",
        missing.headers
    );
    let forged = format!("{}x", &token[..token.len() - 1]);
    assert_eq!(download(&format!("?access_token={forged}")).status, 401);
    let other_secret = sign_hs256(
        &claims("dev-tester", json!(["developer"])),
        b"another-secret-of-sufficient-length-0123456789",
    );
    assert_eq!(
        download(&format!("?access_token={other_secret}")).status,
        401
    );

    // Events: EventSource cannot send headers either.
    let mut sse =
        SseStream::new(server.open_events(&id, None, &format!("?access_token={token}"), None));
    assert_eq!(sse.resp.status, 200);
    let events = sse.until_end(RUN_TIMEOUT);
    assert_eq!(joined(&events, "stdout"), "hello\n");
    assert_eq!(server.open_events(&id, None, "", None).status, 401);

    // Other routes do not take it.
    for path in [
        format!("/api/runs/{id}?access_token={token}"),
        format!("/api/runs/{id}/logs?access_token={token}"),
        format!("/api/runs?access_token={token}"),
        format!("/api/runbooks?access_token={token}"),
    ] {
        let resp = server.call("GET", &path, None, &[], None);
        assert_eq!(resp.status, 401, "{path}: {}", resp.text());
    }

    // Query strings are never logged, so the token does not end up in the server's log.
    let log = server.stderr();
    assert!(!log.is_empty(), "RUST_LOG=debug wrote nothing");
    let signature = token.rsplit('.').next().unwrap();
    assert!(
        !log.contains(signature),
        "the access token appears in the server log"
    );
}
