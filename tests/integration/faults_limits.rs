//! Limits that hold all the time: retention applied as runs end (not only at start and
//! hourly), a state directory that cannot take a new run (full, read-only) refusing the
//! execute before any script starts, and a log that cannot be written any more failing its run.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::runs_support::*;
use crate::util::*;

/// The `.log` and `.json` run files in a runs directory, by run id.
fn stored_runs(runs_dir: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut logs = BTreeSet::new();
    let mut records = BTreeSet::new();
    for entry in fs::read_dir(runs_dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if let Some(id) = name.strip_suffix(".log") {
            logs.insert(id.to_string());
        } else if let Some(id) = name.strip_suffix(".json") {
            records.insert(id.to_string());
        }
    }
    (logs, records)
}

#[test]
fn retention_count_holds_during_a_burst_of_runs() {
    let server = Server::start(
        ServerOpts::new()
            .runbook("Quick.md", Runbook::new("Quick", "echo quick"))
            .env("RUN_RETENTION_COUNT", "5"),
    );
    let tok = dev_token();
    let mut ids = Vec::new();
    for _ in 0..30 {
        let resp = server.execute_when_admitted("Quick.md", "?async=true", &tok, json!({}), &[]);
        assert_eq!(resp.status, 202, "{}", resp.text());
        ids.push(resp.json()["run_id"].as_str().unwrap().to_string());
    }
    // Every run ends (its record says so) or is already gone to retention.
    for id in &ids {
        poll_until(
            RUN_TIMEOUT,
            || server.call("GET", &format!("/api/runs/{id}"), Some(&tok), &[], None),
            |r| {
                r.status == 404
                    || (r.status == 200
                        && !matches!(
                            r.json()["status"].as_str(),
                            Some("running") | Some("cancelling")
                        ))
            },
            |r| format!("run {id} did not end: {} {}", r.status, r.text()),
        );
    }
    let runs_dir = server.state_dir().join("runs");
    let (logs, records) = poll_until(
        RUN_TIMEOUT,
        || stored_runs(&runs_dir),
        |(logs, records)| logs.len() <= 5 && records.len() <= 5,
        |(logs, records)| {
            format!(
                "{} logs and {} records left, wanted at most 5",
                logs.len(),
                records.len()
            )
        },
    );
    assert_eq!(logs, records, "every kept run has both files");
    assert!(!logs.is_empty(), "retention removed every run");
    let listed: BTreeSet<String> = server
        .list_runs("?limit=100", &admin_token())
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, records, "GET /api/runs agrees with the files");
    assert!(listed.iter().all(|id| ids.contains(id)));
}

// ---------------------------------------------------------------------------------------------
// A state directory on a small tmpfs (root only)
// ---------------------------------------------------------------------------------------------

/// A tmpfs mounted for one test; unmounted and removed on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = unique_root().join("state");
        fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("cannot run mount");
        assert!(status.success(), "mount -t tmpfs failed (needs root)");
        Tmpfs { dir }
    }

    fn remount(&self, options: &str) {
        let status = Command::new("mount")
            .args(["-o", options])
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount -o {options} failed");
    }

    /// Fills the file system with a filler file until a write fails.
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut file = fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        let mut written = 0usize;
        loop {
            match file.write(&block) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n,
            }
            assert!(written < 64 * 1024 * 1024, "the tmpfs does not fill");
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        if let Some(root) = self.dir.parent() {
            let _ = fs::remove_dir_all(root);
        }
    }
}

/// A runbook whose script leaves a marker file when it starts.
fn marker_runbook() -> Runbook {
    Runbook::new("Marker", "touch \"$MARKER\"\necho started\n").env("MARKER", "marker file")
}

fn assert_refused(server: &Server, marker: &Path) {
    let resp = server.execute("Marker.md", &dev_token(), json!({"MARKER": marker}));
    assert_eq!(resp.status, 503, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["success"], json!(false), "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("state directory cannot take a new run"),
        "unclear error: {body}"
    );
    // The answer came before any script could start: the refusal is final.
    assert!(!marker.exists(), "the script ran although refused");
}

#[test]
#[ignore = "needs root (mount); CI runs it"]
fn full_state_dir_refuses_then_a_run_that_fills_it_fails_and_stays_readable() {
    let fs = Tmpfs::mount("2m");
    let server = Server::start(
        ServerOpts::new()
            .runbook("Marker.md", marker_runbook())
            .runbook(
                "Flood.md",
                Runbook::new("Flood", "echo $$ > \"$PIDFILE\"\nyes 'a line of output'\n")
                    .env("PIDFILE", "pid file"),
            )
            .env("STATE_DIR", &fs.dir.display().to_string())
            .env("CANCEL_GRACE_SECONDS", "2"),
    );
    let filler = fs.fill();
    let marker = server.root.join("marker");
    assert_refused(&server, &marker);

    // Room again: a run that writes more than fits fails with the write error, its script is
    // stopped, and what was stored stays readable.
    fs::remove_file(&filler).unwrap();
    let tok = dev_token();
    let pidfile = server.root.join("flood.pid");
    let mut live = server.execute_sse("Flood.md", &tok, json!({"PIDFILE": pidfile}));
    let id = live.resp.header("X-Run-Id").unwrap().to_string();
    let events = live.until_done(RUN_TIMEOUT);
    let done = done_json(&events);
    let error = done["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("writing the run log failed"),
        "done without the write error: {done}"
    );
    assert_eq!(done["success"], json!(false));
    let pid: u32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !process_alive(pid)),
        "the script {pid} was not stopped"
    );
    let record = server.wait_finished(&id, &tok, RUN_TIMEOUT);
    assert_eq!(record["status"], json!("failed"), "{record}");
    let logs = server.call(
        "GET",
        &format!("/api/runs/{id}/logs?tail=3"),
        Some(&tok),
        &[],
        None,
    );
    assert_eq!(logs.status, 200, "{}", logs.text());
    let lines = logs.json()["logs"].as_array().unwrap().clone();
    assert!(!lines.is_empty(), "no stored lines: {}", logs.text());
    assert!(
        lines
            .iter()
            .any(|l| l["text"].as_str() == Some("a line of output")),
        "{}",
        logs.text()
    );
    // The stored record on disk says the same.
    let stored: serde_json::Value =
        serde_json::from_slice(&fs::read(fs.dir.join("runs").join(format!("{id}.json"))).unwrap())
            .unwrap();
    assert_eq!(stored["status"], json!("failed"), "{stored}");
    assert!(
        stored["error"]
            .as_str()
            .is_some_and(|e| e.contains("writing the run log failed")),
        "{stored}"
    );
    drop(server);
}

#[test]
#[ignore = "needs root (mount); CI runs it"]
fn read_only_state_dir_refuses_before_the_script_starts() {
    let fs = Tmpfs::mount("4m");
    let server = Server::start(
        ServerOpts::new()
            .runbook("Marker.md", marker_runbook())
            .env("STATE_DIR", &fs.dir.display().to_string()),
    );
    fs.remount("remount,ro");
    let marker = server.root.join("marker");
    assert_refused(&server, &marker);
    drop(server);
}
