//! Runbook files a script (or anyone) turned hostile: swapped for a FIFO or a symlink to
//! /dev/zero, grown past RUNBOOK_MAX_BYTES, nested YAML thousands of levels deep, a script block
//! never closed; and readers racing History appends. Every run concludes, nothing hangs, the
//! server keeps answering.

use std::fs;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::*;

/// Far above any answer that does not wait on a script, far below "hangs".
const PROMPT: Duration = Duration::from_secs(15);

fn dir_var(server: &Server) -> Value {
    json!({"RB_DIR": server.runbooks_dir().display().to_string()})
}

/// A finished run's record.
fn record(server: &Server, run_id: &str) -> Value {
    let resp = server.get(&format!("/api/runs/{run_id}"), Some(&dev_token()));
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()
}

/// `GET path` answers within [`PROMPT`] with `status`; returns the body.
fn prompt_get(server: &Server, path: &str, status: u16) -> Value {
    let started = Instant::now();
    let resp = server.get(path, Some(&dev_token()));
    assert!(
        started.elapsed() < PROMPT,
        "{path} took {:?}",
        started.elapsed()
    );
    assert_eq!(resp.status, status, "{path}: {}", resp.text());
    resp.json()
}

fn listed(server: &Server) -> Vec<String> {
    prompt_get(server, "/api/runbooks", 200)["runbooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["filename"].as_str().unwrap().to_string())
        .collect()
}

/// Runs `file` synchronously and returns its answer (200, or 500 for a failed run) and record
/// once both are in.
fn run_to_end(server: &Server, file: &str) -> (Value, Value) {
    let resp = server.execute(file, &dev_token(), dir_var(server));
    assert!(resp.status == 200 || resp.status == 500, "{}", resp.text());
    let answer = resp.json();
    let run_id = answer["run_id"].as_str().unwrap().to_string();
    let rec = record(server, &run_id);
    (answer, rec)
}

fn history_error(rec: &Value) -> String {
    rec["history_error"]
        .as_str()
        .unwrap_or_else(|| panic!("no history_error in {rec}"))
        .to_string()
}

#[test]
fn a_runbook_swapped_for_a_fifo_still_concludes_its_run() {
    let script = "rm \"$RB_DIR/Swap.md\"\nmkfifo \"$RB_DIR/Swap.md\"\necho swapped\n";
    let server = Server::start(
        ServerOpts::new()
            .runbook("Swap.md", Runbook::new("Swap", script).env("RB_DIR", "dir"))
            .runbook("Other.md", Runbook::new("Other", "echo other\n"))
            .env("MAX_CONCURRENT_RUNS", "1"),
    );
    let (answer, rec) = run_to_end(&server, "Swap.md");
    assert_eq!(answer["success"], true, "{answer}");
    assert_eq!(answer["stdout"], "swapped\n");
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert!(history_error(&rec).contains("FIFO"), "{rec}");
    let kind = fs::symlink_metadata(server.runbooks_dir().join("Swap.md")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&kind.file_type()));

    // The server reads neither the FIFO nor waits on it, and the run's slot is free again.
    assert_eq!(listed(&server), vec!["Other.md"]);
    let body = prompt_get(&server, "/api/runbooks/Swap.md", 404);
    assert_eq!(body["success"], false);
    prompt_get(&server, "/api/runbooks/Swap.md/required-env", 404);
    let (answer, rec) = run_to_end(&server, "Other.md");
    assert_eq!(answer["stdout"], "other\n", "{answer}");
    assert!(rec.get("history_error").is_none(), "{rec}");
}

#[test]
fn a_runbook_swapped_for_a_symlink_to_dev_zero_is_never_read() {
    let script = "rm \"$RB_DIR/Zero.md\"\nln -s /dev/zero \"$RB_DIR/Zero.md\"\necho linked\n";
    let server = Server::start(
        ServerOpts::new()
            .runbook("Zero.md", Runbook::new("Zero", script).env("RB_DIR", "dir"))
            .runbook("Real.md", Runbook::new("Real", "echo real\n")),
    );
    let (answer, rec) = run_to_end(&server, "Zero.md");
    assert_eq!(answer["stdout"], "linked\n", "{answer}");
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert!(history_error(&rec).contains("symbolic link"), "{rec}");

    // A link made by hand, even to a runbook inside the directory, is not followed either.
    std::os::unix::fs::symlink(
        server.runbooks_dir().join("Real.md"),
        server.runbooks_dir().join("Alias.md"),
    )
    .unwrap();
    assert_eq!(listed(&server), vec!["Real.md"]);
    for file in ["Zero.md", "Alias.md"] {
        prompt_get(&server, &format!("/api/runbooks/{file}"), 404);
        let resp = server.execute(file, &dev_token(), json!({}));
        assert_eq!(resp.status, 404, "{}", resp.text());
    }
}

#[test]
fn a_runbook_grown_past_the_limit_is_refused_clearly() {
    // The script appends 5000 bytes to its own runbook, past RUNBOOK_MAX_BYTES.
    let script = "head -c 5000 /dev/zero | tr '\\000' x >> \"$RB_DIR/Grow.md\"\necho grown\n";
    let server = Server::start(
        ServerOpts::new()
            .runbook("Grow.md", Runbook::new("Grow", script).env("RB_DIR", "dir"))
            .env("RUNBOOK_MAX_BYTES", "4096"),
    );
    let before = fs::read(server.runbooks_dir().join("Grow.md")).unwrap();
    let (answer, rec) = run_to_end(&server, "Grow.md");
    assert_eq!(answer["stdout"], "grown\n", "{answer}");
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert!(history_error(&rec).contains("RUNBOOK_MAX_BYTES"), "{rec}");
    let after = fs::read(server.runbooks_dir().join("Grow.md")).unwrap();
    assert_eq!(after.len(), before.len() + 5000, "no entry was added");

    assert_eq!(listed(&server), vec!["Grow.md"]);
    for (method, path) in [
        ("GET", "/api/runbooks/Grow.md"),
        ("GET", "/api/runbooks/Grow.md/required-env"),
        ("PATCH", "/api/runbooks/Grow.md/validate"),
        ("POST", "/api/runbooks/Grow.md/execute"),
    ] {
        let resp = server.json_request(method, path, &dev_token(), &json!({}));
        assert_eq!(resp.status, 422, "{path}: {}", resp.text());
        let error = resp.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains("RUNBOOK_MAX_BYTES (4096 bytes)"), "{error}");
    }
}

#[test]
fn deeply_nested_yaml_is_a_validation_error_not_a_crash() {
    let shapes = [
        ("Dash.md", "- ".repeat(3000) + "x"),
        ("Flow.md", "[".repeat(3000) + &"]".repeat(3000)),
        (
            "Indent.md",
            (0..3000)
                .map(|level| format!("{}k:\n", " ".repeat(level)))
                .collect(),
        ),
    ];
    let mut opts = ServerOpts::new();
    for (file, yaml) in &shapes {
        let name = file.trim_end_matches(".md");
        let text = format!(
            "# {name}\n# Environment Requirements\n```yaml\n{yaml}\n```\n# File System Requirements\n```yaml\nInput:\n```\n# Script\n```sh\necho should-not-run\n```\n# History\n"
        );
        opts = opts.file(file, text.as_bytes());
    }
    let mut server = Server::start(opts);
    assert_eq!(listed(&server), vec!["Dash.md", "Flow.md", "Indent.md"]);
    for (file, _) in &shapes {
        let body = prompt_get(&server, &format!("/api/runbooks/{file}"), 200);
        assert!(body["content"].as_str().unwrap().len() > 3000);
        let body = prompt_get(&server, &format!("/api/runbooks/{file}/required-env"), 200);
        assert_eq!(body["required"], json!([]), "{body}");

        let resp = server.json_request(
            "PATCH",
            &format!("/api/runbooks/{file}/validate"),
            &dev_token(),
            &json!({}),
        );
        assert_eq!(resp.status, 400, "{}", resp.text());
        let errors = resp.json()["errors"].to_string();
        assert!(
            errors.contains("deeper than 64") || errors.contains("recursion limit"),
            "{errors}"
        );

        let (answer, rec) = run_to_end(&server, file);
        assert_eq!(answer["success"], false, "{answer}");
        assert!(!answer["stdout"]
            .as_str()
            .unwrap()
            .contains("should-not-run"));
        assert_eq!(rec["status"], "failed", "{rec}");
    }
    assert!(server.is_running());
    assert_eq!(prompt_get(&server, "/healthz", 200)["status"], "ok");
}

#[test]
fn a_script_block_never_closed_gets_no_history_entry() {
    let text = "# Open\n# Environment Requirements\n```yaml\n```\n# File System Requirements\n```yaml\nInput:\n```\n# Script\n```sh\necho hi\n# History\n";
    let server = Server::start(ServerOpts::new().file("Open.md", text.as_bytes()));
    let (answer, rec) = run_to_end(&server, "Open.md");
    // Validation refuses it today: the run exists, fails, and its entry is refused.
    assert_eq!(answer["success"], false, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("never closed"),
        "{answer}"
    );
    assert_eq!(rec["status"], "failed", "{rec}");
    let error = history_error(&rec);
    assert!(
        error.contains("line 10") && error.contains("never closed"),
        "{error}"
    );
    assert_eq!(
        server.read_runbook("Open.md"),
        text,
        "the file is unchanged"
    );
}

/// Whether every code block of `markdown` is closed and it ends with a whole line.
fn structurally_whole(markdown: &str) -> bool {
    let mut open = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            open = !open;
        }
    }
    !open && markdown.ends_with('\n')
}

#[test]
fn readers_never_see_a_half_written_history_and_the_lock_is_a_hidden_sidecar() {
    // Long entries, and trimming, so both in-place appends and rewrites happen.
    let script =
        "i=0\nwhile [ $i -lt 400 ]; do echo \"line $i of run $RUNBOOK_RUN_ID\"; i=$((i+1)); done\n";
    let server = Server::start(
        ServerOpts::new()
            .runbook("Busy.md", Runbook::new("Busy", script))
            .env("HISTORY_MAX_ENTRIES", "5"),
    );
    let runs = 20;
    let mut reads = 0;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..runs)
            .map(|_| scope.spawn(|| run_to_end(&server, "Busy.md")))
            .collect();
        while !workers.iter().all(|w| w.is_finished()) {
            let body = prompt_get(&server, "/api/runbooks/Busy.md", 200);
            let content = body["content"].as_str().unwrap();
            assert!(structurally_whole(content), "a torn read:\n{content}");
            for entry in history_entries(content) {
                let lines = entry.lines().filter(|l| l.starts_with("line ")).count();
                assert_eq!(lines, 400, "a partial entry:\n{entry}");
            }
            reads += 1;
        }
        for worker in workers {
            let (answer, rec) = worker.join().unwrap();
            assert_eq!(answer["success"], true, "{answer}");
            assert!(rec.get("history_error").is_none(), "{rec}");
        }
    });
    assert!(reads > 0);
    assert_eq!(server.history_entries("Busy.md").len(), 5);

    let mut names: Vec<String> = fs::read_dir(server.runbooks_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![".Busy.md.lock", "Busy.md"],
        "no temporary file left"
    );
    assert_eq!(listed(&server), vec!["Busy.md"]);
}

#[test]
fn a_reader_waits_for_a_history_write_in_progress() {
    let server =
        Server::start(ServerOpts::new().runbook("Held.md", Runbook::new("Held", "echo held\n")));
    let path = server.runbooks_dir().join("Held.md");
    let whole = server.read_runbook("Held.md");
    // This test plays the History writer: it holds the sidecar lock while the file is half
    // written, as runbookd's own writer does.
    let sidecar = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(server.runbooks_dir().join(".Held.md.lock"))
        .unwrap();
    sidecar.lock().unwrap();
    let half =
        format!("{whole}\n### 2026-01-01T00:00:00.000Z | Exit Code: 0\n\n**Stdout:**\n```\nhal");
    fs::write(&path, &half).unwrap();
    let finished = format!("{whole}\n### 2026-01-01T00:00:00.000Z | Exit Code: 0\n\n**Stdout:**\n```\nhalf and whole\n```\n");
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| prompt_get(&server, "/api/runbooks/Held.md", 200));
        // The server opens the sidecar to lock it: once it holds it open, the reader has got
        // as far as the lock (one that ignored the lock would have read the half entry).
        let sidecar_path = server.runbooks_dir().join(".Held.md.lock");
        assert!(
            wait_until(Duration::from_secs(30), || holds_open(
                server.pid(),
                &sidecar_path
            )),
            "the reader never opened the sidecar lock"
        );
        fs::write(&path, &finished).unwrap();
        sidecar.unlock().unwrap();
        let body = reader.join().unwrap();
        assert_eq!(body["content"], finished.as_str());
    });
}

#[test]
fn a_lock_held_elsewhere_delays_history_only_boundedly() {
    let server =
        Server::start(ServerOpts::new().runbook("Lock.md", Runbook::new("Lock", "echo ran\n")));
    // Anyone who can write the runbooks directory (a script's leftover process, say) can hold
    // the sidecar lock; here the test does.
    let sidecar = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(server.runbooks_dir().join(".Lock.md.lock"))
        .unwrap();
    sidecar.lock().unwrap();
    let started = Instant::now();
    let (answer, rec) = run_to_end(&server, "Lock.md");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(answer["stdout"], "ran\n", "{answer}");
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert!(history_error(&rec).contains("held elsewhere"), "{rec}");
    sidecar.unlock().unwrap();
    assert!(server.history_entries("Lock.md").is_empty());
}
