//! Issue 11's hot path: what the spawn of a script must keep while it is made cheaper (no
//! signal blocked or ignored, the server's original soft descriptor limit, whatever limit and
//! ignored signals the server inherited, and a server that inherited SIGHUP ignored keeps
//! ignoring it), `RUST_LOG=runbookd::stages=debug` logging each run's stages, finished run
//! directories reused by the next runs only empty and as they were made, and spare run files
//! made only once the runs are quiet, not between the runs of a loop.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{
    dev_token, request, spawn_listening, stop_server, unique_root, wrapped_server_env, Runbook,
    Server, ServerOpts,
};

/// Prints the script's cgroup and soft descriptor limit, then its blocked and ignored signal
/// masks (read by `exec grep`: the masks the shell was started with, not the ones it sets
/// while waiting for a child).
const PROBE: &str =
    "cat /proc/self/cgroup\nulimit -S -n\nexec grep -E '^(SigBlk|SigIgn):' /proc/self/status\n";

/// Starts runbookd under `sh -c "<prelude>; exec runbookd"` with `RUN_CGROUP` as given.
fn start_wrapped(root: &Path, prelude: &str, run_cgroup: &str) -> (std::process::Child, u16) {
    std::fs::create_dir_all(root.join("runbooks")).unwrap();
    std::fs::write(
        root.join("runbooks").join("Probe.md"),
        Runbook::new("Probe", PROBE).render(),
    )
    .unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{prelude}; exec \"$0\""))
        .arg(env!("CARGO_BIN_EXE_runbookd"))
        .current_dir(root);
    wrapped_server_env(&mut cmd, root);
    cmd.env("RUN_CGROUP", run_cgroup);
    spawn_listening(cmd, &root.join("server.stderr")).unwrap_or_else(|why| panic!("{why}"))
}

fn execute_probe(port: u16) -> Value {
    let auth = format!("Bearer {}", dev_token());
    let resp = request(
        port,
        "POST",
        "/api/runbooks/Probe.md/execute",
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        Some(b"{}"),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()
}

/// (blocked mask, ignored mask, soft limit) from the probe's output.
fn probe_values(stdout: &str) -> (u64, u64, u64) {
    let field = |name: &str| {
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {stdout:?}"));
        u64::from_str_radix(line.trim(), 16).unwrap()
    };
    let soft = stdout
        .lines()
        .find(|l| !l.contains("::") && !l.contains(':'))
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no limit in {stdout:?}"));
    (field("SigBlk:"), field("SigIgn:"), soft)
}

/// Bit of `signal` in a /proc signal mask.
fn bit(signal: i32) -> u64 {
    1 << (signal - 1)
}

/// The hard descriptor limit of this process.
fn hard_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        .and_then(|h| h.parse().ok())
        .unwrap_or(4096)
}

/// Runs the probe on servers started with a soft limit at the hard one (nothing to give
/// back) and below it (the server raises its own, the script gets it back), with INT, QUIT
/// and HUP inherited ignored; checks what the script got, and that the server survives a
/// SIGHUP. Returns each probe's output.
fn probe_both_limits(run_cgroup: &str) -> Vec<String> {
    let hard = hard_limit();
    let mut outputs = Vec::new();
    for (label, soft) in [("soft at hard", hard), ("soft below hard", 256.min(hard))] {
        let root = unique_root();
        let prelude = format!("trap '' INT QUIT HUP; ulimit -S -n {soft}");
        let (mut child, port) = start_wrapped(&root, &prelude, run_cgroup);
        let body = execute_probe(port);
        // The server goes on ignoring what it inherited ignored.
        let hup = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(hup.success());
        let health = request(port, "GET", "/healthz", &[], None).status;
        let alive = child.try_wait().unwrap().is_none();
        stop_server(&mut child);
        let _ = std::fs::remove_dir_all(&root);
        assert!(alive && health == 200, "{label}: SIGHUP ended the server");
        let stdout = body["stdout"].as_str().unwrap_or_default().to_string();
        let (blocked, ignored, script_soft) = probe_values(&stdout);
        assert_eq!(
            blocked, 0,
            "{label}: signals blocked in the script: {stdout}"
        );
        for (name, signal) in [
            ("HUP", 1),
            ("INT", 2),
            ("QUIT", 3),
            ("TERM", 15),
            ("XFSZ", 25),
        ] {
            assert_eq!(
                ignored & bit(signal),
                0,
                "{label}: SIG{name} ignored in the script: {stdout}"
            );
        }
        assert_eq!(script_soft, soft, "{label}: descriptor limit of the script");
        outputs.push(format!(
            "{}\n{stdout}",
            body["run_id"].as_str().unwrap_or_default()
        ));
    }
    outputs
}

#[test]
fn scripts_start_with_default_signals_and_the_original_descriptor_limit() {
    let outputs = probe_both_limits("off");
    assert!(
        outputs.iter().all(|o| !o.contains("runbookd-")),
        "{outputs:?}"
    );
}

#[test]
#[ignore = "needs root and cgroup v2; CI runs it"]
fn scripts_forked_into_their_run_cgroup_start_the_same_and_inside_it() {
    for output in probe_both_limits("") {
        let run_id = output.lines().next().unwrap_or_default();
        assert!(
            output.contains(&format!("runbookd-{run_id}")),
            "the script is not in its run's cgroup: {output}"
        );
    }
}

#[test]
fn stage_timing_logs_every_stage_of_a_run() {
    let server = Server::start(
        ServerOpts::new()
            .runbook("Echo.md", Runbook::new("Echo", "echo hi\n"))
            .env("RUST_LOG", "warn,runbookd::stages=debug"),
    );
    let resp = server.execute("Echo.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let run_id = resp.json()["run_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let stderr = server.stderr();
        if let Some(line) = stderr
            .lines()
            .find(|l| l.contains("runbookd::stages]") && l.contains(&run_id))
        {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no stage line: {stderr}");
        std::thread::sleep(Duration::from_millis(20));
    };
    for stage in [
        "to execute ",
        "runbook ",
        "admission ",
        "log file ",
        "record ",
        "work dir ",
        "spawn ",
        "script and readers ",
        "final record ",
        "history ",
        "response ",
        "; total ",
    ] {
        assert!(line.contains(stage), "no {stage:?} in {line}");
    }
}

/// Waits until `EXECUTION_DIR` holds one spare directory and nothing else.
fn wait_for_one_spare(server: &Server) {
    let exec_dir = server.exec_dir();
    let names = || -> Vec<String> {
        std::fs::read_dir(&exec_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let one_spare = crate::util::wait_until(Duration::from_secs(10), || {
        let names = names();
        names.len() == 1 && names[0].starts_with("runbookd-spare-")
    });
    assert!(one_spare, "not one spare directory alone: {:?}", names());
}

/// Runs `Dir.md` once; (its working directory, its inode, what it listed there).
fn run_in_dir(server: &Server) -> (String, String, String) {
    let resp = server.execute("Dir.md", &dev_token(), json!({}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let stdout = resp.json()["stdout"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut lines = stdout.splitn(3, '\n');
    let pwd = lines.next().unwrap_or_default().to_string();
    let inode = lines.next().unwrap_or_default().to_string();
    let listing = lines.next().unwrap_or_default().to_string();
    (pwd, inode, listing)
}

#[test]
fn the_next_run_gets_a_finished_run_directory_emptied_under_its_own_name() {
    let script = "pwd\nstat -c %i .\nls -A\necho left > left.txt\nmkdir -p sub/deeper && echo x > sub/deeper/f\n";
    let server = Server::start(ServerOpts::new().runbook("Dir.md", Runbook::new("Dir", script)));
    let (first_dir, first_inode, first_listing) = run_in_dir(&server);
    assert_eq!(first_listing, "", "a fresh working directory is empty");
    // The directory is put back once the result is out.
    wait_for_one_spare(&server);
    let (second_dir, second_inode, second_listing) = run_in_dir(&server);
    assert_eq!(
        second_listing, "",
        "what the first run left is gone: {second_listing:?}"
    );
    assert_ne!(first_dir, second_dir, "each run has its own path");
    assert_eq!(
        first_inode, second_inode,
        "the directory itself was reused, not made again"
    );
    // Only the spare is left between runs, and no run's name.
    wait_for_one_spare(&server);

    // A run that changes its directory's mode leaves it to be removed, not reused.
    let chmod = "pwd\nstat -c %i .\nls -A\nchmod 700 .\n";
    std::fs::write(
        server.runbooks_dir().join("Dir.md"),
        Runbook::new("Dir", chmod).render(),
    )
    .unwrap();
    let (_, chmod_inode, _) = run_in_dir(&server);
    assert_eq!(chmod_inode, second_inode);
    // Not kept: removed instead.
    let exec_dir = server.exec_dir();
    assert!(
        crate::util::wait_until(Duration::from_secs(10), || {
            std::fs::read_dir(&exec_dir).unwrap().next().is_none()
        }),
        "the changed directory was neither removed nor kept"
    );
    std::fs::write(
        server.runbooks_dir().join("Dir.md"),
        Runbook::new("Dir", "pwd\nstat -c %a .\nls -A\n").render(),
    )
    .unwrap();
    let (_, mode, listing) = run_in_dir(&server);
    assert_eq!(listing, "");
    assert_ne!(
        mode, "700",
        "a directory whose mode a script changed is not reused"
    );
}

/// The spare files in the server's runs directory.
fn spare_files(server: &Server) -> usize {
    std::fs::read_dir(server.state_dir().join("runs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".spare-"))
        .count()
}

/// How long after the last run ended the server starts making spares again (`ahead.rs`).
const QUIET_AFTER: Duration = Duration::from_millis(250);

#[test]
fn a_loop_of_runs_takes_spare_files_and_they_are_made_again_once_the_runs_are_quiet() {
    let server = Server::start(
        ServerOpts::new()
            .runbook("Echo.md", Runbook::new("Echo", "echo hi\n"))
            .env("SPARE_RUN_FILES", "40")
            .env("MAX_CONCURRENT_RUNS", "2"),
    );
    assert!(
        crate::util::wait_until(Duration::from_secs(20), || spare_files(&server) == 40),
        "the spares were not made at start: {}",
        spare_files(&server)
    );
    let token = dev_token();
    let mut before = 40;
    let mut checked = 0;
    for _ in 0..8 {
        let sent = Instant::now();
        let resp = server.execute("Echo.md", &token, json!({}));
        assert_eq!(resp.status, 200, "{}", resp.text());
        // Long enough for spares made between runs (as before: 5 ms after a run) to show,
        // short enough that the run, which ended after `sent`, ended less than QUIET_AFTER ago.
        std::thread::sleep(Duration::from_millis(60));
        let now = spare_files(&server);
        if sent.elapsed() < QUIET_AFTER - Duration::from_millis(20) {
            assert_eq!(now, before - 2, "the run took its log and record from the spares, and none was made between the loop's runs");
            checked += 1;
        }
        before = now;
    }
    assert!(
        checked > 0,
        "every request of the loop took longer than {QUIET_AFTER:?}: nothing checked"
    );
    assert!(
        crate::util::wait_until(Duration::from_secs(20), || spare_files(&server) == 40),
        "the spares were not made again once the runs were quiet: {}",
        spare_files(&server)
    );
}
