//! The run's process life: clients that vanish or stop reading, concurrent runs, descendants
//! that outlive the main process, exit codes from signals and missing interpreters, timeouts and
//! bounded memory.

use std::collections::{BTreeSet, HashMap};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::runs_support::RunsApi;
use crate::util::*;

fn pid_from(stdout: &str) -> u32 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .unwrap_or_else(|| panic!("no pid= line in {stdout:?}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn disconnecting_sse_client_does_not_stop_the_run() {
    let server = Server::start(ServerOpts::new().runbook(
        "Slow.md",
        Runbook::new("Slow", "echo start\nsleep 2\necho end\n"),
    ));
    let mut sse = server.execute_sse("Slow.md", &dev_token(), json!({}));
    let first = loop {
        let ev = sse
            .next_event(Duration::from_secs(20))
            .expect("a first output event");
        if ev.event == "stdout" {
            break ev;
        }
    };
    assert_eq!(first.data, "start\n");
    sse.resp.disconnect();
    drop(sse);
    let entries = server.wait_for_history("Slow.md", 1, Duration::from_secs(30));
    let (_, code, _) = entry_header(&entries[0]);
    assert_eq!(code, 0, "{}", entries[0]);
    assert!(
        entries[0].contains("end"),
        "the run went on to the end: {}",
        entries[0]
    );
}

#[test]
fn disconnecting_sync_client_does_not_stop_the_run() {
    let server = Server::start(ServerOpts::new().runbook(
        "Slow.md",
        Runbook::new("Slow", "echo start\nsleep 1\necho end\n"),
    ));
    let token = dev_token();
    let auth = format!("Bearer {token}");
    let stream = send_request(
        server.port,
        "HTTP/1.1",
        "POST",
        "/api/runbooks/Slow.md/execute",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(b"{}"),
    );
    // Disconnect mid-run: once the run has printed its first line.
    let runs = poll_until(
        Duration::from_secs(30),
        || server.list_runs("", &token),
        |runs| !runs.is_empty(),
        |runs| format!("the run never started: {runs:?}"),
    );
    let id = runs[0]["run_id"].as_str().unwrap().to_string();
    server.wait_output(&id, &token, "stdout", "its first line", &|t| {
        t.starts_with("start\n")
    });
    drop(stream);
    let entries = server.wait_for_history("Slow.md", 1, Duration::from_secs(30));
    assert_eq!(entry_header(&entries[0]).1, 0);
    assert!(entries[0].contains("end"), "{}", entries[0]);
}

#[test]
fn stalled_viewer_blocks_nothing_and_is_cut_off() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Flood.md",
                Runbook::new(
                    "Flood",
                    "yes 'flood flood flood flood flood flood flood flood flood flood flood flood' | head -c 20000000\necho finished >&2\n",
                ),
            )
            .runbook("Small.md", Runbook::new("Small", "echo small"))
            .env("VIEWER_STALL_SECONDS", "2"),
    );
    // Open the stream and do not read its body.
    let mut stalled = server.execute_sse("Flood.md", &dev_token(), json!({}));
    let opened = Instant::now();
    thread::sleep(Duration::from_millis(500));

    // Other requests are served meanwhile.
    let t = Instant::now();
    assert_eq!(server.get("/healthz", None).status, 200);
    assert_eq!(server.get("/api/runbooks", Some(&dev_token())).status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "slow answers: {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    let mut other = server.execute_sse("Small.md", &dev_token(), json!({}));
    let events = other.until_done(Duration::from_secs(20));
    assert_eq!(joined(&events, "stdout"), "small\n");
    assert!(t.elapsed() < Duration::from_secs(15));

    // The flooding run finishes although its only viewer does not read.
    let entries = server.wait_for_history("Flood.md", 1, Duration::from_secs(120));
    let (_, code, _) = entry_header(&entries[0]);
    assert_eq!(code, 0, "{}", &entries[0][..entries[0].len().min(500)]);
    assert!(entries[0].contains("finished"));

    // Stay stalled well past VIEWER_STALL_SECONDS (the kernel buffers fill within moments).
    let stalled_for = Duration::from_secs(6);
    if opened.elapsed() < stalled_for {
        thread::sleep(stalled_for - opened.elapsed());
    }
    // The stalled viewer was cut off: reading now drains at most what the kernel buffered and
    // then the connection ends (or is reset) without a done event.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut parser = SseParser::new();
    let mut saw_done = false;
    loop {
        match stalled.resp.next_body(deadline) {
            BodyRead::Data(bytes, at) => {
                if parser.feed(&bytes, at).iter().any(|e| e.event == "done") {
                    saw_done = true;
                }
            }
            BodyRead::End | BodyRead::Failed(_) => break,
            BodyRead::TimedOut => {
                panic!("the stalled viewer's connection was still open after the run ended")
            }
        }
    }
    assert!(
        !saw_done,
        "a viewer blocked for more than VIEWER_STALL_SECONDS should have been ended"
    );
    assert!(server.get("/healthz", None).status == 200);
}

#[test]
fn twenty_concurrent_runs_keep_their_own_output() {
    let server = Server::start(
        ServerOpts::new().runbook(
            "Conc.md",
            Runbook::new(
                "Conc",
                "echo \"value=$UNIQ\"\nsleep 0.2\necho \"err=$UNIQ\" >&2\necho \"again=$UNIQ\"\n",
            )
            .env("UNIQ", "a value unique to the run"),
        ),
    );
    let port = server.port;
    let started = Instant::now();
    let handles: Vec<_> = (0..20)
        .map(|i| {
            thread::spawn(move || {
                let uniq = format!("u{i}-{}", uuid::Uuid::new_v4().simple());
                let body = serde_json::to_vec(&json!({"env_vars": {"UNIQ": uniq}})).unwrap();
                let auth = format!("Bearer {}", dev_token());
                let resp = request(
                    port,
                    "POST",
                    "/api/runbooks/Conc.md/execute",
                    &[
                        ("Authorization", &auth),
                        ("Content-Type", "application/json"),
                    ],
                    Some(&body),
                );
                (uniq, resp)
            })
        })
        .collect();
    let mut runs: HashMap<String, String> = HashMap::new();
    for h in handles {
        let (uniq, resp) = h.join().unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        let body = resp.json();
        assert_eq!(
            body["stdout"],
            json!(format!("value={uniq}\nagain={uniq}\n"))
        );
        assert_eq!(body["stderr"], json!(format!("err={uniq}\n")));
        runs.insert(body["run_id"].as_str().unwrap().to_string(), uniq);
    }
    assert_eq!(runs.len(), 20, "distinct run ids");
    assert!(started.elapsed() < Duration::from_secs(90));

    let entries = server.wait_for_history("Conc.md", 20, Duration::from_secs(10));
    assert_eq!(entries.len(), 20, "exactly 20 entries");
    let mut seen = BTreeSet::new();
    for entry in &entries {
        let (time, code, run) = entry_header(entry);
        assert_eq!(code, 0, "{entry}");
        assert!(
            chrono::DateTime::parse_from_rfc3339(&time).is_ok(),
            "heading time {time:?}"
        );
        let run = run.unwrap_or_else(|| panic!("no run id in {entry}"));
        let uniq = runs
            .get(&run)
            .unwrap_or_else(|| panic!("entry for unknown run {run}: {entry}"));
        assert_eq!(entry.matches("value=").count(), 1, "{entry}");
        assert!(entry.contains(&format!("value={uniq}\n")), "{entry}");
        assert!(entry.contains(&format!("again={uniq}\n")), "{entry}");
        assert!(entry.contains(&format!("err={uniq}\n")), "{entry}");
        assert_eq!(
            entry.matches("```").count() % 2,
            0,
            "fences balanced: {entry}"
        );
        seen.insert(run);
    }
    assert_eq!(seen.len(), 20);
}

#[test]
fn setsid_escapee_cannot_keep_the_run_open() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Escape.md",
                Runbook::new(
                    "Escape",
                    "setsid sh -c 'sleep 30; echo late' &\necho \"pid=$!\"\necho main done\n",
                ),
            )
            .env("ORPHAN_GRACE_MS", "300"),
    );
    let t = Instant::now();
    let resp = server.execute("Escape.md", &dev_token(), json!({}));
    let elapsed = t.elapsed();
    let body = resp.json();
    let stdout = body["stdout"].as_str().unwrap().to_string();
    // Clean up the escapee (its own session, so its process group id is its pid).
    let pid = pid_from(&stdout);
    kill_group(pid);
    assert!(
        elapsed < Duration::from_secs(20),
        "the run should end soon after the main process (the escapee sleeps 30 s), took {elapsed:?}"
    );
    assert_eq!(body["return_code"], json!(0), "{body}");
    assert!(stdout.contains("main done\n"), "{stdout}");
    assert!(!stdout.contains("late"));
}

#[test]
fn backgrounded_grandchild_does_not_hold_the_run() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Bg.md",
                Runbook::new("Bg", "sleep 100 &\necho \"pid=$!\"\necho main done\n"),
            )
            .runbook(
                "Stopped.md",
                Runbook::new(
                    "Stopped",
                    "sleep 100 &\nkill -STOP $!\necho \"pid=$!\"\necho main done\n",
                ),
            )
            .env("ORPHAN_GRACE_MS", "300"),
    );
    for file in ["Bg.md", "Stopped.md"] {
        let t = Instant::now();
        let body = server.execute(file, &dev_token(), json!({})).json();
        let elapsed = t.elapsed();
        let stdout = body["stdout"].as_str().unwrap().to_string();
        let pid = pid_from(&stdout);
        let gone = wait_until(Duration::from_secs(5), || !process_alive(pid));
        if !gone {
            kill_group(pid);
        }
        assert!(
            elapsed < Duration::from_secs(20),
            "{file}: the grandchild (sleep 100) kept the run open for {elapsed:?}"
        );
        assert_eq!(body["return_code"], json!(0), "{file}: {body}");
        assert!(stdout.contains("main done"), "{file}");
        assert!(
            gone,
            "{file}: the process group was not terminated (pid {pid} alive)"
        );
    }
}

/// Niceness in a `stat` line (field 19).
fn nice_in_stat(stat: &str) -> i32 {
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name
        .split_whitespace()
        .nth(16)
        .unwrap()
        .parse()
        .unwrap()
}

/// This process's niceness (a server started by the tests inherits it).
fn own_nice() -> i32 {
    nice_in_stat(&std::fs::read_to_string("/proc/self/stat").unwrap())
}

/// The niceness of each of the server's threads named `name`.
fn thread_nices(pid: u32, name: &str) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .filter(|stat| stat.contains(&format!("({name})")))
        .map(|stat| nice_in_stat(&stat))
        .collect()
}

#[test]
fn scripts_run_nicer_than_the_server_as_configured() {
    let own = own_nice();
    for (setting, expected) in [
        (None, (own + 5).min(19)),
        (Some("0"), own),
        (Some("2"), (own + 2).min(19)),
    ] {
        let mut opts = ServerOpts::new().runbook("Nice.md", Runbook::new("Nice", "nice\n"));
        if let Some(value) = setting {
            opts = opts.env("SCRIPT_NICE", value);
        }
        let server = Server::start(opts);
        let body = server.execute("Nice.md", &dev_token(), json!({})).json();
        assert_eq!(
            body["stdout"],
            json!(format!("{expected}\n")),
            "SCRIPT_NICE {setting:?}: {body}"
        );
        // The run's thread (kept for the next run) reads the pipes at the script's niceness;
        // the request threads keep the server's.
        let runs = thread_nices(server.pid(), "run");
        assert!(!runs.is_empty(), "no run thread waits");
        assert!(runs.iter().all(|&n| n == expected), "run threads {runs:?}");
        let requests = thread_nices(server.pid(), "http");
        assert!(!requests.is_empty(), "no request thread waits");
        assert!(
            requests.iter().all(|&n| n == own),
            "request threads {requests:?}"
        );
    }
}

#[test]
fn missing_interpreter_is_127() {
    let server = Server::start(ServerOpts::new().runbook(
        "NoInterp.md",
        Runbook::new("NoInterp", "#!/nonexistent/bin/interp\necho never\n"),
    ));
    let resp = server.execute("NoInterp.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 500, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["return_code"], json!(127), "{body}");
    assert!(
        !body["stderr"].as_str().unwrap_or("").trim().is_empty(),
        "a stderr message explains it: {body}"
    );
    assert!(!body["stdout"].as_str().unwrap_or("").contains("never"));
    let entries = server.wait_for_history("NoInterp.md", 1, Duration::from_secs(5));
    assert_eq!(entry_header(&entries[0]).1, 127);
}

#[test]
fn signal_deaths_are_128_plus_signal() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Kill9.md",
                Runbook::new("Kill9", "echo before\nkill -9 $$\necho after\n"),
            )
            .runbook(
                "Term.md",
                Runbook::new(
                    "Term",
                    "grep -E '^Sig(Blk|Ign)' /proc/$$/status\nkill -TERM $$\necho after\n",
                ),
            ),
    );
    let resp = server.execute("Kill9.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 500);
    let body = resp.json();
    assert_eq!(body["return_code"], json!(137), "{body}");
    assert_eq!(body["stdout"], json!("before\n"));
    let body = server.execute("Term.md", &dev_token(), json!({})).json();
    assert_eq!(body["return_code"], json!(143), "{body}");
}

#[test]
fn script_timeout_terminates_the_group() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Sleepy.md",
                Runbook::new("Sleepy", "echo begin\nsleep 30\necho never\n"),
            )
            .runbook(
                "Stubborn.md",
                Runbook::new(
                    "Stubborn",
                    "trap '' TERM\necho begin\nsleep 30\necho never\n",
                ),
            )
            .env("SCRIPT_TIMEOUT_SECONDS", "1"),
    );
    let t = Instant::now();
    let body = server.execute("Sleepy.md", &dev_token(), json!({})).json();
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(
        body["return_code"],
        json!(143),
        "TERM after the timeout: {body}"
    );
    assert_eq!(body["stdout"], json!("begin\n"));

    let t = Instant::now();
    let body = server
        .execute("Stubborn.md", &dev_token(), json!({}))
        .json();
    let elapsed = t.elapsed();
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    assert!(
        elapsed >= Duration::from_secs(3),
        "KILL comes after a 5 s grace, took {elapsed:?}"
    );
    assert_ne!(body["return_code"], json!(0), "{body}");
    assert!(!body["stdout"].as_str().unwrap().contains("never"));
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn memory_stays_bounded_for_large_output() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Huge.md",
                Runbook::new(
                    "Huge",
                    "yes 'a line of output for the memory test, repeated many times over' | head -c 60000000\n",
                ),
            )
            .runbook("Tiny.md", Runbook::new("Tiny", "echo tiny")),
    );
    // Warm up (threads, buffers) before taking the baseline.
    assert_eq!(
        server.execute("Tiny.md", &dev_token(), json!({})).status,
        200
    );
    let baseline = status_kib(server.pid(), "VmRSS:");
    let resp = server.execute("Huge.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 200);
    let body = resp.json();
    assert_eq!(body["truncated"]["stdout"], json!(true));
    assert_eq!(body["stdout"].as_str().unwrap().len(), 10_485_760);
    let peak = status_kib(server.pid(), "VmHWM:");
    let growth_mib = peak.saturating_sub(baseline) / 1024;
    eprintln!("memory: baseline RSS {baseline} KiB, peak {peak} KiB after 60 MB of output");
    assert!(
        growth_mib < 40,
        "60 MB of output grew the server's peak RSS by {growth_mib} MiB (baseline {baseline} KiB, peak {peak} KiB)"
    );
}
