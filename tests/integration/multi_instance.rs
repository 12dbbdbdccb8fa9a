//! Two runbookd instances (`r1`, `r2`: own STATE_DIR and EXECUTION_DIR, one shared
//! RUNBOOKS_DIR) behind a real nginx running the shipped nginx/runbookd.conf with its
//! several-instances lines enabled: concurrent History appends from both, an instance killed
//! mid-run and started again, resuming a run's events through nginx, and sub-runbooks. Those
//! need nginx, so they are ignored by a plain `cargo test`; CI runs them (a missing nginx fails
//! them). Also: a second instance on a STATE_DIR in use is refused (no nginx needed).

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use crate::deploy::{free_port, several_instances_conf, sync_execute, Nginx};
use crate::runs_support::*;
use crate::util::*;

/// nginx in front of both instances: every `RunsApi` call goes through it.
struct Front {
    port: u16,
}

impl RunsApi for Front {
    fn api_port(&self) -> u16 {
        self.port
    }
}

/// The directory holding the shared runbooks and the gate files, removed on drop.
struct SharedDir(PathBuf);

impl Drop for SharedDir {
    fn drop(&mut self) {
        if std::env::var_os("RUNBOOKD_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Two instances sharing one runbooks directory, and nginx in front of them.
struct Fleet {
    /// Kept running for the test (stopped on drop).
    _nginx: Nginx,
    front: Front,
    r1: Daemon,
    r2: Daemon,
    /// Whether r2's process is running (the tests kill and restart it).
    r2_up: bool,
    shared: SharedDir,
}

impl Fleet {
    /// Starts `r1` and `r2` on fixed ports (a restarted instance must come back where nginx
    /// looks for it), with `runbooks` (file, markdown) written to the one RUNBOOKS_DIR they
    /// share and `env` added to both.
    fn start(runbooks: &[(&str, String)], env: &[(&str, &str)]) -> Fleet {
        let shared = SharedDir(unique_root());
        let runbooks_dir = shared.0.join("runbooks");
        fs::create_dir_all(&runbooks_dir).unwrap();
        for (file, runbook) in runbooks {
            fs::write(runbooks_dir.join(file), runbook).unwrap();
        }
        let runbooks_dir = runbooks_dir.display().to_string();
        let instance = |id: &str| {
            let port = free_port().to_string();
            let mut all = vec![
                ("INSTANCE_ID", id),
                ("API_PORT", port.as_str()),
                ("RUNBOOKS_DIR", runbooks_dir.as_str()),
                ("SHUTDOWN_GRACE_SECONDS", "2"),
            ];
            all.extend_from_slice(env);
            Daemon::start(&[], &all)
        };
        let r1 = instance("r1");
        let r2 = instance("r2");
        let port = free_port();
        let conf = several_instances_conf(r1.port, r2.port, port);
        for enabled in [
            "\nupstream runbookd_r2 {",
            "\n    ~^/api/runs/r2-  runbookd_r2;",
        ] {
            assert!(conf.contains(enabled), "{enabled:?} not enabled:\n{conf}");
        }
        let nginx = Nginx::start(&need_program("nginx"), &conf, port);
        Fleet {
            front: Front { port: nginx.port },
            _nginx: nginx,
            r1,
            r2,
            r2_up: true,
            shared,
        }
    }

    fn runbook_text(&self, file: &str) -> String {
        fs::read_to_string(self.shared.0.join("runbooks").join(file)).unwrap()
    }

    fn gate(&self, name: &str) -> Gate {
        Gate::new(&self.shared.0, name)
    }

    fn kill9_r2(&mut self) {
        self.r2.kill9();
        self.r2_up = false;
    }

    fn restart_r2(&mut self) {
        self.r2.restart(&[]);
        self.r2_up = true;
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Stopped with SIGTERM, so that the instances end their runs' scripts themselves.
        let mut instances = vec![&mut self.r1];
        if self.r2_up {
            instances.push(&mut self.r2);
        }
        for daemon in &instances {
            // Not asserted: a drop during a failed test must not panic again.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &daemon.pid().to_string()])
                .status();
        }
        for daemon in instances {
            let _ = daemon.wait_exit(Duration::from_secs(10));
        }
    }
}

/// The run id's instance: `r1` or `r2`.
fn owner(id: &str) -> &str {
    id.split('-').next().unwrap_or_default()
}

fn ids_of(runs: &[Value]) -> BTreeSet<String> {
    runs.iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect()
}

/// What a run of the History test prints: its id first and last, lines between.
fn shared_stdout(id: &str) -> String {
    let lines: String = (1..=30).map(|i| format!("line {i} of {id}\n")).collect();
    format!("begin {id}\n{lines}end {id}\n")
}

#[test]
#[ignore = "needs nginx; CI runs it"]
fn concurrent_runs_on_two_instances_leave_every_history_entry_intact() {
    const RUNS: usize = 20;
    // Every run waits for one gate, so that all of them end (and append) at the same moment.
    let script = format!(
        "echo \"begin $RUNBOOK_RUN_ID\"\n\
         i=1\n\
         while [ $i -le 30 ]; do echo \"line $i of $RUNBOOK_RUN_ID\"; i=$((i + 1)); done\n\
         {}\
         echo \"end $RUNBOOK_RUN_ID\"\n",
        wait_for_gate("GATE")
    );
    // History is kept to 20 entries and already holds 9, so that three of the appends find it
    // full, drop the three oldest entries and rewrite the file (a full History is trimmed to
    // 90 %) while the others append: the lock must cover the read as well as the write. The
    // old entries are the oldest, so exactly the 20 runs' entries are left.
    let original = Runbook::new("Shared", &script).env("GATE", "gate").render();
    let old: String = (1..=9)
        .map(|i| format!("\n### 2020-01-01T00:00:0{i}.000Z | Exit Code: 0 | Run: r0-old-{i}\n\n**Stdout:**\n```\nold {i}\n```\n"))
        .collect();
    let fleet = Fleet::start(
        &[("Shared.md", format!("{original}{old}"))],
        &[("HISTORY_MAX_ENTRIES", &RUNS.to_string())],
    );
    let token = Arc::new(dev_token());
    let gate = fleet.gate("shared");

    // All at once, through nginx, which balances them over both instances.
    let go = Arc::new(Barrier::new(RUNS));
    let port = fleet.front.port;
    let handles: Vec<_> = (0..RUNS)
        .map(|_| {
            let (go, token, gate) = (go.clone(), token.clone(), gate.path());
            thread::spawn(move || {
                go.wait();
                let auth = format!("Bearer {token}");
                let body = serde_json::to_vec(&json!({"env_vars": {"GATE": gate}})).unwrap();
                let resp = request(
                    port,
                    "POST",
                    "/api/runbooks/Shared.md/execute",
                    &[
                        ("Authorization", &auth),
                        ("Content-Type", "application/json"),
                    ],
                    Some(&body),
                );
                assert_eq!(resp.status, 200, "{}", resp.text());
                let body = resp.json();
                let id = body["run_id"].as_str().unwrap().to_string();
                assert_eq!(body["stdout"], json!(shared_stdout(&id)), "{body}");
                id
            })
        })
        .collect();
    let running = || {
        [&fleet.r1, &fleet.r2]
            .iter()
            .map(|d| d.list_runs("?status=running&limit=100", &token).len())
            .sum::<usize>()
    };
    poll_until(
        RUN_TIMEOUT,
        running,
        |n| *n == RUNS,
        |n| format!("{n} of {RUNS} runs going"),
    );
    gate.open();
    let ids: BTreeSet<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(ids.len(), RUNS, "distinct run ids: {ids:?}");
    let on = |instance: &str| -> BTreeSet<String> {
        ids.iter()
            .filter(|id| owner(id) == instance)
            .cloned()
            .collect()
    };
    let (on_r1, on_r2) = (on("r1"), on("r2"));
    assert!(!on_r1.is_empty() && !on_r2.is_empty(), "balanced: {ids:?}");
    assert_eq!(on_r1.len() + on_r2.len(), RUNS, "{ids:?}");

    // The shared runbook: unchanged up to its History, then one whole entry per run.
    let text = fleet.runbook_text("Shared.md");
    assert!(
        text.starts_with(&original),
        "the runbook before its entries changed:\n{text}"
    );
    let entries = history_entries(&text);
    assert_eq!(entries.len(), RUNS, "{text}");
    let mut seen = BTreeSet::new();
    for entry in &entries {
        let (time, code, run) = entry_header(entry);
        let id = run.unwrap_or_else(|| panic!("an entry without a run id: {entry:?}"));
        assert!(
            chrono::DateTime::parse_from_rfc3339(&time).is_ok(),
            "{entry:?}"
        );
        assert_eq!(code, 0, "{entry:?}");
        assert_eq!(
            *entry,
            format!(
                "{time} | Exit Code: 0 | Run: {id}\n\n**Stdout:**\n```\n{}```\n",
                shared_stdout(&id)
            ),
            "a malformed entry"
        );
        assert!(seen.insert(id.clone()), "{id} has two entries");
    }
    assert_eq!(seen, ids, "one entry per run");

    // Both instances read the same History; each lists only its own runs.
    for (daemon, own) in [(&fleet.r1, &on_r1), (&fleet.r2, &on_r2)] {
        let resp = daemon.call("GET", "/api/runbooks/Shared.md", Some(&token), &[], None);
        assert_eq!(resp.status, 200, "{}", resp.text());
        let content = resp.json()["content"].as_str().unwrap().to_string();
        assert_eq!(content, text);
        assert_eq!(&ids_of(&daemon.list_runs("?limit=100", &token)), own);
    }
}

#[test]
#[ignore = "needs nginx; CI runs it"]
fn killed_instance_answers_502_for_its_runs_and_recovers_them_when_started_again() {
    let slow = Runbook::new("Slow", "echo \"started $RUNBOOK_RUN_ID\"\nsleep 120\n");
    let hello = Runbook::new("Hello", "echo hello\n");
    let mut fleet = Fleet::start(
        &[("Slow.md", slow.render()), ("Hello.md", hello.render())],
        &[],
    );
    let token = dev_token();
    let front = &fleet.front;

    // Four runs, balanced over both instances, each going.
    let ids: Vec<String> = (0..4)
        .map(|_| front.start_run("Slow.md", &token, json!({})))
        .collect();
    for id in &ids {
        let started = format!("started {id}\n");
        front.wait_output(id, &token, "stdout", "its first line", &|t| t == started);
        assert_eq!(front.run_record(id, &token)["status"], json!("running"));
    }
    let (on_r1, on_r2): (Vec<String>, Vec<String>) =
        ids.iter().cloned().partition(|id| owner(id) == "r1");
    assert!(!on_r1.is_empty() && !on_r2.is_empty(), "balanced: {ids:?}");
    let mut viewer = front.attach(&on_r2[0], &token, "", None);
    let first = viewer.next_event(RUN_TIMEOUT).expect("the replayed line");
    assert_eq!(first.event, "stdout", "{first:?}");

    fleet.kill9_r2();
    let front = &fleet.front;

    // The viewer of a run on r2 is cut off without a `done`.
    let (rest, _) = drain_events(&mut viewer.resp, RUN_TIMEOUT);
    assert!(rest.iter().all(|e| e.event != "done"), "{rest:?}");

    // r2's runs: 502 from nginx, which sends them nowhere else.
    for id in &on_r2 {
        for path in [
            format!("/api/runs/{id}"),
            format!("/api/runs/{id}/events"),
            format!("/api/runs/{id}/logs"),
        ] {
            let resp = front.call("GET", &path, Some(&token), &[], None);
            assert_eq!(resp.status, 502, "{path}: {}", resp.text());
        }
        let resp = front.cancel(id, &token);
        assert_eq!(resp.status, 502, "cancel {id}: {}", resp.text());
    }
    // r1 keeps serving: its runs, and every new execute.
    for id in &on_r1 {
        assert_eq!(front.run_record(id, &token)["status"], json!("running"));
        assert_eq!(
            front.stored_output(id, &token, "stdout"),
            format!("started {id}\n")
        );
    }
    for _ in 0..4 {
        let resp = sync_execute(front.port, "Hello.md", &token);
        assert_eq!(resp.status, 200, "{}", resp.text());
        let id = resp.json()["run_id"].as_str().unwrap().to_string();
        assert_eq!(owner(&id), "r1", "{id}");
    }
    let slow_history = history_entries(&fleet.runbook_text("Slow.md"));
    assert!(slow_history.is_empty(), "{slow_history:?}");

    // Started again on the same STATE_DIR: r2's runs are interrupted, with their entries, and
    // readable through nginx again.
    fleet.restart_r2();
    let front = &fleet.front;
    for id in &on_r2 {
        let record = front.run_record(id, &token);
        assert_eq!(record["status"], json!("interrupted"), "{record}");
        assert_eq!(record["return_code"], json!(-1), "{record}");
        // Its leftover script was stopped (not "left alone").
        assert_eq!(
            record["error"],
            json!("the server stopped while the run was going"),
            "{record}"
        );
        let mut events = front.attach(id, &token, "", None);
        let events = events.until_end(RUN_TIMEOUT);
        assert_eq!(joined(&events, "stdout"), format!("started {id}\n"));
        assert_eq!(done_json(&events)["return_code"], json!(-1));
        let logs = front.call(
            "GET",
            &format!("/api/runs/{id}/logs"),
            Some(&token),
            &[],
            None,
        );
        assert_eq!(logs.status, 200, "{}", logs.text());
        assert!(
            logs.text().contains(&format!("started {id}")),
            "{}",
            logs.text()
        );
    }
    let entries = history_entries(&fleet.runbook_text("Slow.md"));
    assert_eq!(entries.len(), on_r2.len(), "{entries:?}");
    for entry in &entries {
        let (_, code, run) = entry_header(entry);
        let id = run.expect("a run id");
        assert!(on_r2.contains(&id), "{entry}");
        assert_eq!(code, -1, "{entry}");
        assert!(
            entry.contains(&format!("**Stdout:**\n```\nstarted {id}\n```")),
            "{entry}"
        );
        assert!(
            entry.contains("runbookd: the server stopped while the run was going"),
            "{entry}"
        );
    }

    // Cancel reaches r1's runs through nginx; every run now has its entry.
    for id in &on_r1 {
        let resp = front.cancel(id, &token);
        assert_eq!(resp.status, 202, "cancel {id}: {}", resp.text());
        // `done` comes once the record and the History entry are written.
        let events = front.attach(id, &token, "", None).until_end(RUN_TIMEOUT);
        assert_eq!(done_json(&events)["status"], json!("cancelled"));
        let record = front.run_record(id, &token);
        assert_eq!(record["status"], json!("cancelled"), "{record}");
    }
    let entries = history_entries(&fleet.runbook_text("Slow.md"));
    let recorded: BTreeSet<String> = entries
        .iter()
        .map(|e| entry_header(e).2.expect("a run id"))
        .collect();
    assert_eq!(recorded, ids.iter().cloned().collect::<BTreeSet<_>>());
    assert_eq!(entries.len(), ids.len(), "{entries:?}");
}

/// `out N` lines 1 to 20, a wait for the gate, then 21 to 40.
fn gated_count_script() -> String {
    let count = |from: u32, to: u32| {
        format!(
            "i={from}\nwhile [ $i -le {to} ]; do echo \"out $i\"; sleep 0.01; i=$((i + 1)); done\n"
        )
    };
    format!("{}{}{}", count(1, 20), wait_for_gate("GATE"), count(21, 40))
}

fn count_stdout(from: u32, to: u32) -> String {
    (from..=to).map(|i| format!("out {i}\n")).collect()
}

/// Output ids must run 1, 2, ... without a gap or a repeat.
fn assert_numbered_from(outputs: &[Output], first: u64) {
    let ids: Vec<u64> = outputs.iter().map(|o| o.0).collect();
    let expected: Vec<u64> = (first..first + ids.len() as u64).collect();
    assert_eq!(ids, expected);
}

#[test]
#[ignore = "needs nginx; CI runs it"]
fn events_resume_through_nginx_on_the_owner_without_gap_or_duplicate() {
    let count = Runbook::new("Count", &gated_count_script()).env("GATE", "gate");
    let fleet = Fleet::start(&[("Count.md", count.render())], &[]);
    let token = dev_token();
    let front = &fleet.front;

    // One run on each instance (nginx balances two executes in turn).
    let runs: Vec<(String, Gate)> = (0..2)
        .map(|i| {
            let gate = fleet.gate(&format!("count-{i}"));
            let id = front.start_run("Count.md", &token, json!({"GATE": gate.path()}));
            (id, gate)
        })
        .collect();
    let owners: BTreeSet<&str> = runs.iter().map(|(id, _)| owner(id)).collect();
    assert_eq!(owners, BTreeSet::from(["r1", "r2"]), "one run per instance");

    for (id, gate) in &runs {
        // A viewer through nginx reads up to `out 10`, then its connection drops.
        let mut first = front.attach(id, &token, "", None);
        assert_eq!(first.resp.header("X-Run-Id"), Some(id.as_str()));
        let before = events_until(&mut first, RUN_TIMEOUT, "with out 10", &|e| {
            e.data.contains("out 10\n")
        });
        let before = outputs(&before);
        assert_numbered_from(&before, 1);
        let last_id = before.last().unwrap().0;
        first.resp.disconnect();
        drop(first);

        // It resumes through nginx after the last id it saw, while the run is still going.
        let mut resumed = front.attach(id, &token, "", Some(&last_id.to_string()));
        assert_eq!(resumed.resp.header("X-Run-Id"), Some(id.as_str()));
        let upto_gate = events_until(&mut resumed, RUN_TIMEOUT, "with out 20", &|e| {
            e.data.contains("out 20\n")
        });
        assert_eq!(
            front.run_record(id, &token)["status"],
            json!("running"),
            "{id} waits for its gate"
        );
        gate.open();
        let mut after = upto_gate;
        after.extend(resumed.until_end(RUN_TIMEOUT));
        let after_outputs = outputs(&after);
        assert_numbered_from(&after_outputs, last_id + 1);
        let done = after.last().unwrap();
        assert_eq!(done.event, "done");
        assert_eq!(done.numeric_id(), after_outputs.last().unwrap().0 + 1);
        assert_eq!(done.json()["return_code"], json!(0), "{id}");

        // Together, exactly the run's output, and exactly what a full replay gives.
        let mut joined_outputs = before.clone();
        joined_outputs.extend(after_outputs);
        assert_eq!(stream_text(&joined_outputs, "stdout"), count_stdout(1, 40));
        let replay = front.attach(id, &token, "", None).until_end(RUN_TIMEOUT);
        assert_eq!(outputs(&replay), joined_outputs, "{id}");

        // Resuming at `done` has nothing left: 204.
        let at_done = front.open_events(id, Some(&token), "", Some(&done.numeric_id().to_string()));
        assert_eq!(at_done.status, 204, "{id}: {:?}", at_done.headers);
    }
}

/// Not behind nginx: the mistake a second instance's unit copied without changing STATE_DIR
/// would make.
#[test]
fn a_second_instance_on_the_same_state_dir_is_refused_and_leaves_the_runs_alone() {
    let gated = Runbook::new("Gated", &format!("{}echo through\n", wait_for_gate("GATE")))
        .env("GATE", "gate");
    let first = Daemon::start(&[("Gated.md", gated.render())], &[]);
    let token = dev_token();
    let gate = Gate::new(&first.root, "gated");
    let id = first.start_run("Gated.md", &token, json!({"GATE": gate.path()}));

    let mut cmd = base_command();
    let root = &first.root;
    cmd.current_dir(root)
        .env("API_PORT", "0")
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("INSTANCE_ID", "r2")
        .env("STATE_DIR", root.join("state"))
        .env("EXECUTION_DIR", root.join("exec"))
        .env("RUNBOOKS_DIR", root.join("runbooks"))
        .env("JWT_SECRET", TEST_SECRET)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(root.join("second.stderr")).unwrap());
    let mut second = cmd.spawn().unwrap();
    let mut status = None;
    let exited = wait_until(Duration::from_secs(20), || {
        status = second.try_wait().unwrap();
        status.is_some()
    });
    if !exited {
        let _ = second.kill();
        let _ = second.wait();
    }
    let stderr = fs::read_to_string(root.join("second.stderr")).unwrap();
    assert!(
        exited,
        "a second instance on the same STATE_DIR runs:\n{stderr}"
    );
    assert_eq!(status.unwrap().code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("STATE_DIR: another runbookd is using this STATE_DIR"),
        "{stderr}"
    );

    // The first instance's run went on untouched, and ends normally.
    assert_eq!(first.run_record(&id, &token)["status"], json!("running"));
    gate.open();
    let record = first.wait_finished(&id, &token, RUN_TIMEOUT);
    assert_eq!(record["status"], json!("succeeded"), "{record}");
    assert_eq!(first.stored_output(&id, &token, "stdout"), "through\n");
}

/// A parent's script: the child's result through RUNBOOK_URL (its own instance), then, on a
/// line of its own, its own run record read through nginx (port `$FRONT`) with its run token.
const PARENT: &str = r#"curl -s -X POST "$RUNBOOK_URL/Child.md/execute" -H "$RUNBOOK_H_AUTH" -H "$RUNBOOK_H_CORR" -H "$RUNBOOK_H_RECUR" -H "$RUNBOOK_H_CTYPE" -d '{}'
echo
curl -s "http://127.0.0.1:$FRONT/api/runs/$RUNBOOK_RUN_ID" -H "$RUNBOOK_H_AUTH"
echo
"#;

#[test]
#[ignore = "needs nginx and curl; CI runs it"]
fn sub_runbooks_run_on_their_parents_instance() {
    need_program("curl");
    let fleet = Fleet::start(
        &[
            ("Child.md", Runbook::new("Child", "echo child\n").render()),
            (
                "Parent.md",
                Runbook::new("Parent", PARENT)
                    .env("FRONT", "nginx port")
                    .render(),
            ),
        ],
        &[],
    );
    let token = dev_token();
    let front = &fleet.front;
    let env = json!({"FRONT": front.port.to_string()});
    let mut children = BTreeSet::new();
    let mut parents = BTreeSet::new();
    for _ in 0..2 {
        let resp = front.execute_raw("Parent.md", "", &token, env.clone(), &[]);
        assert_eq!(resp.status, 200, "{}", resp.text());
        let parent = resp.json();
        assert_eq!(parent["return_code"], json!(0), "{parent}");
        let parent_id = parent["run_id"].as_str().unwrap().to_string();
        let stdout = parent["stdout"].as_str().unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{stdout}");
        let child: Value = serde_json::from_str(lines[0]).unwrap();
        let own: Value = serde_json::from_str(lines[1]).unwrap();
        // The child ran on the parent's instance.
        assert_eq!(child["return_code"], json!(0), "{child}");
        assert_eq!(child["stdout"], json!("child\n"), "{child}");
        let child_id = child["run_id"].as_str().unwrap().to_string();
        assert_eq!(
            owner(&child_id),
            owner(&parent_id),
            "{child_id} of {parent_id}"
        );
        // The run token reads its own run through nginx: routed to the owner.
        assert_eq!(own["run_id"], json!(parent_id), "{own}");
        assert_eq!(own["status"], json!("running"), "{own}");
        parents.insert(owner(&parent_id).to_string());
        children.insert(child_id);
    }
    assert_eq!(parents, BTreeSet::from(["r1".into(), "r2".into()]));
    // Both children's entries are in the one shared Child.md.
    let entries = history_entries(&fleet.runbook_text("Child.md"));
    let recorded: BTreeSet<String> = entries
        .iter()
        .map(|e| entry_header(e).2.expect("a run id"))
        .collect();
    assert_eq!(recorded, children);
}
