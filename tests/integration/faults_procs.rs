//! Processes around faults: after a restart only a process group provably the run's is
//! signalled (recycled pids, another boot and foreign groups are left alone and the runs say
//! why); `kill -9` of the server during 20 live runs; and, with a run cgroup, `setsid` and
//! double-fork escapees die with their run (timeout, cancel, and a restart after `kill -9`).
//! The cgroup tests need root and a writable cgroup v2 mount.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use crate::runs_support::*;
use crate::util::*;

/// Loose bound for a killed process to disappear.
const DEATH_TIMEOUT: Duration = Duration::from_secs(15);

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string()
}

/// Fields of `/proc/<pid>/stat` after the command name (index 0 = field 3, the state).
fn stat_fields(pid: u32) -> Vec<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    rest.split_whitespace().map(String::from).collect()
}

/// Start time of a process in clock ticks since boot.
fn start_ticks(pid: u32) -> u64 {
    stat_fields(pid)[19].parse().unwrap()
}

fn pgrp_of(pid: u32) -> u32 {
    stat_fields(pid)[2].parse().unwrap()
}

/// A process unrelated to any run: `sleep 300` in its own process group, killed on drop.
struct Unrelated(Child);

impl Unrelated {
    fn start() -> Unrelated {
        let child = Command::new("sleep")
            .arg("300")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        Unrelated(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Unrelated {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process group whose leader is gone: a shell (the leader) starts `sleep 300` in its group
/// and exits. Returns (group id, the sleep's pid); the guard kills the group on drop.
fn orphaned_group() -> (u32, u32, GroupGuard) {
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg("sleep 300 >/dev/null 2>&1 & echo $!")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id();
    let out = child.wait_with_output().unwrap();
    let member: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(pgrp_of(member), pgid);
    assert!(!process_alive(pgid), "the leader has exited and was reaped");
    (pgid, member, GroupGuard(pgid))
}

#[test]
fn a_group_guard_kills_what_is_left_of_its_group() {
    // The tests below rely on it: a failing or finished test leaves no `sleep 300` behind.
    let (pgid, member, guard) = orphaned_group();
    assert!(process_alive(member));
    drop(guard);
    assert!(
        wait_until(DEATH_TIMEOUT, || !process_alive(member)),
        "the member of group {pgid} outlived its guard"
    );
}

fn forged_run_id(n: u32) -> String {
    format!("r1-{:08x}-0000-4000-8000-{:012x}", std::process::id(), n)
}

/// Writes the record (and an empty log) of a run a killed server would have left going.
fn forge_running_record(
    runs_dir: &Path,
    run_id: &str,
    runbook: &str,
    pgid: u32,
    ticks: u64,
    boot: &str,
) {
    let record = json!({
        "run_id": run_id,
        "runbook": runbook,
        "status": "running",
        "user": "dev-tester",
        "started_at": chrono::Utc::now().to_rfc3339(),
        "finished_at": null,
        "duration_ms": null,
        "return_code": null,
        "stdout_bytes": 0,
        "stderr_bytes": 0,
        "truncated": false,
        "pgid": pgid,
        "pgid_start_ticks": ticks,
        "boot_id": boot,
    });
    fs::write(
        runs_dir.join(format!("{run_id}.json")),
        serde_json::to_vec_pretty(&record).unwrap(),
    )
    .unwrap();
    fs::write(runs_dir.join(format!("{run_id}.log")), b"").unwrap();
}

/// A run's record as stored in the runs directory.
fn stored_record(runs_dir: &Path, run_id: &str) -> Value {
    serde_json::from_slice(&fs::read(runs_dir.join(format!("{run_id}.json"))).unwrap()).unwrap()
}

fn entry_of<'a>(entries: &'a [String], run_id: &str) -> &'a str {
    entries
        .iter()
        .find(|e| entry_header(e).2.as_deref() == Some(run_id))
        .unwrap_or_else(|| panic!("no history entry of {run_id}: {entries:?}"))
}

#[test]
fn restart_signals_only_a_group_that_is_provably_the_runs() {
    let mut daemon = Daemon::start(
        &[("Forged.md", Runbook::new("Forged", "echo hi\n").render())],
        &[],
    );
    let token = dev_token();
    daemon.kill9();
    let runs_dir = daemon.runs_dir();
    let boot = boot_id();

    // A recycled pid: the process has the leader's pid but started later than recorded (the
    // old check took any process that started at or after the recorded time).
    let recycled = Unrelated::start();
    let recycled_id = forged_run_id(1);
    let ticks = start_ticks(recycled.pid());
    forge_running_record(
        &runs_dir,
        &recycled_id,
        "Forged.md",
        recycled.pid(),
        ticks - 1,
        &boot,
    );
    // The exact start time, but recorded during another boot.
    let other_boot = Unrelated::start();
    let other_boot_id = forged_run_id(2);
    forge_running_record(
        &runs_dir,
        &other_boot_id,
        "Forged.md",
        other_boot.pid(),
        start_ticks(other_boot.pid()),
        "00000000-0000-4000-8000-000000000000",
    );
    // The leader is gone and its group id names a group whose member is older than the
    // recorded leader: someone else's.
    let (foreign_pgid, foreign_member, _foreign_guard) = orphaned_group();
    let foreign_id = forged_run_id(3);
    forge_running_record(
        &runs_dir,
        &foreign_id,
        "Forged.md",
        foreign_pgid,
        start_ticks(foreign_member) + 100,
        &boot,
    );
    // Controls, which are the runs' by the rule and must die: the exact leader, and a group
    // whose leader is gone but whose member started after it.
    let exact = Unrelated::start();
    let exact_id = forged_run_id(4);
    forge_running_record(
        &runs_dir,
        &exact_id,
        "Forged.md",
        exact.pid(),
        start_ticks(exact.pid()),
        &boot,
    );
    let (left_pgid, left_member, _left_guard) = orphaned_group();
    let left_id = forged_run_id(5);
    forge_running_record(
        &runs_dir,
        &left_id,
        "Forged.md",
        left_pgid,
        start_ticks(left_member),
        &boot,
    );

    daemon.restart(&[]);
    // Recovery is over before the server listens; the controls were signalled in it.
    assert!(
        wait_until(DEATH_TIMEOUT, || !process_alive(exact.pid())
            && !process_alive(left_member)),
        "the runs' own leftovers were not killed (exact leader alive: {}, member alive: {})",
        process_alive(exact.pid()),
        process_alive(left_member)
    );
    for (what, pid) in [
        ("the recycled pid", recycled.pid()),
        ("the other boot's process", other_boot.pid()),
        ("the foreign group's member", foreign_member),
    ] {
        assert!(process_alive(pid), "{what} ({pid}) was signalled");
    }

    let entries =
        history_entries(&fs::read_to_string(daemon.runbooks_dir().join("Forged.md")).unwrap());
    for (id, pgid, why) in [
        (&recycled_id, recycled.pid(), "is another process now"),
        (&other_boot_id, other_boot.pid(), "boot id differs"),
        (
            &foreign_id,
            foreign_pgid,
            "members older than the run's script",
        ),
    ] {
        assert_eq!(
            daemon.run_record(id, &token)["status"],
            json!("interrupted")
        );
        // The stored record says why (the API shows no error field).
        let record = stored_record(&runs_dir, id);
        let error = record["error"].as_str().unwrap_or_default().to_string();
        let expected = format!("its process group {pgid} was not signalled");
        assert!(
            error.contains(&expected) && error.contains(why),
            "{id}: {error:?} should say {expected:?} and {why:?}"
        );
        let entry = entry_of(&entries, id);
        assert!(entry.contains(&expected), "{entry}");
    }
    for id in [&exact_id, &left_id] {
        let record = stored_record(&runs_dir, id);
        assert_eq!(record["status"], json!("interrupted"), "{record}");
        assert_eq!(
            record["error"],
            json!("the server stopped while the run was going"),
            "{record}"
        );
    }
}

#[test]
fn kill_9_during_20_live_runs_then_a_start_interrupts_them_all_and_nothing_else() {
    const RUNS: usize = 20;
    let unrelated = Unrelated::start();
    let script = "echo \"pgid=$$\"\nsleep 300\n";
    let mut daemon = Daemon::start(&[("Live.md", Runbook::new("Live", script).render())], &[]);
    let token = dev_token();
    let ids: Vec<String> = (0..RUNS)
        .map(|_| daemon.start_run("Live.md", &token, json!({})))
        .collect();
    let mut guards = Vec::new();
    for id in &ids {
        let out = daemon.wait_output(id, &token, "stdout", "its pgid", &|t| t.contains("pgid="));
        guards.push(GroupGuard(number_after(&out, "pgid=")));
    }
    // Every record on disk names its group before the server dies.
    let on_disk = |id: &String| stored_record(&daemon.runs_dir(), id);
    assert!(
        wait_until(Duration::from_secs(30), || ids
            .iter()
            .all(|id| on_disk(id)["pgid"].is_u64())),
        "not every record names its process group"
    );

    daemon.kill9();
    for guard in &guards {
        assert!(
            !group_members(guard.0).is_empty(),
            "group {} should outlive the killed server",
            guard.0
        );
    }
    daemon.restart(&[]);
    for id in &ids {
        let record = daemon.run_record(id, &token);
        assert_eq!(record["status"], json!("interrupted"), "{record}");
        assert_eq!(record["return_code"], json!(-1), "{record}");
    }
    let entries =
        history_entries(&fs::read_to_string(daemon.runbooks_dir().join("Live.md")).unwrap());
    assert_eq!(entries.len(), RUNS, "{entries:?}");
    for id in &ids {
        entry_of(&entries, id);
    }
    for guard in &guards {
        assert!(
            wait_until(DEATH_TIMEOUT, || group_members(guard.0).is_empty()),
            "group {} of an interrupted run lives on: {:?}",
            guard.0,
            group_members(guard.0)
        );
    }
    assert!(
        process_alive(unrelated.pid()),
        "an unrelated process was signalled"
    );
    // Their working directories are gone too.
    let left: Vec<_> = fs::read_dir(daemon.root.join("exec"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "run directories left behind: {left:?}");
}

#[test]
fn without_a_cgroup_the_start_log_says_so_once() {
    let daemon = Daemon::start(
        &[("Hello.md", Runbook::new("Hello", "echo hello\n").render())],
        &[("RUN_CGROUP", "off")],
    );
    let token = dev_token();
    for _ in 0..2 {
        let id = daemon.start_run("Hello.md", &token, json!({}));
        let record = daemon.wait_finished(&id, &token, RUN_TIMEOUT);
        assert_eq!(record["status"], json!("succeeded"), "{record}");
    }
    let stderr = daemon.stderr();
    let said = stderr
        .lines()
        .filter(|l| l.contains("runs are not placed in cgroups"))
        .count();
    assert_eq!(said, 1, "{stderr}");
    assert!(stderr.contains("RUN_CGROUP=off"), "{stderr}");
}

#[test]
fn a_run_cgroup_that_cannot_be_used_refuses_the_start() {
    let root = unique_root();
    for value in [
        root.join("missing").display().to_string(),
        root.display().to_string(),
    ] {
        let mut cmd = base_command();
        cmd.current_dir(&root)
            .env("API_PORT", "0")
            .env("STATE_DIR", root.join("state"))
            .env("JWT_SECRET", TEST_SECRET)
            .env("RUN_CGROUP", &value);
        let err = match spawn_listening(cmd, &root.join("server.stderr")) {
            Ok((mut child, _)) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("started with RUN_CGROUP={value}");
            }
            Err(e) => e,
        };
        assert!(
            err.contains("RUN_CGROUP: ") && err.contains("cgroup v2"),
            "RUN_CGROUP={value}: {err}"
        );
    }
    let _ = fs::remove_dir_all(&root);
}

// ---------------------------------------------------------------------------------------------
// With a run cgroup (root and cgroup v2)
// ---------------------------------------------------------------------------------------------

/// A cgroup made for one test under the cgroup v2 mount (found in /proc/self/mountinfo);
/// removed with whatever is left in it on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn create() -> TestCgroup {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = mountinfo
            .lines()
            .filter_map(|l| l.split_once(" - "))
            .find(|(_, right)| right.starts_with("cgroup2 "))
            .and_then(|(left, _)| left.split_whitespace().nth(4))
            .map(PathBuf::from);
        let mount = mount.unwrap_or_else(|| panic!("no cgroup v2 mount in:\n{mountinfo}"));
        let dir = mount.join(format!(
            "runbookd-tests-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create a cgroup under {} (needs root): {e}",
                mount.display()
            )
        });
        TestCgroup(dir)
    }

    fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(entries) = fs::read_dir(&self.0) {
            for child in entries.flatten().filter(|e| e.path().is_dir()) {
                let _ = fs::write(child.path().join("cgroup.kill"), "1");
                let _ = wait_until(Duration::from_secs(5), || {
                    fs::remove_dir(child.path()).is_ok()
                });
            }
        }
        let _ = fs::remove_dir(&self.0);
    }
}

/// Starts two escapees of the process group (a `setsid` child, and a double-forked `setsid`
/// grandchild), prints their pids, and waits.
const ESCAPING: &str = "echo \"pgid=$$\"
setsid sh -c 'exec sleep 300' >/dev/null 2>&1 &
echo \"escapee=$!\"
sh -c 'setsid sleep 300 >/dev/null 2>&1 & echo \"double=$!\"'
sleep 300
";

/// Kills a process this test knows about when dropped.
struct PidGuard(u32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if process_alive(self.0) {
            let _ = Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
}

/// The run's group and its two escapees, once they run outside the group.
fn escapees<A: RunsApi>(server: &A, id: &str, token: &str) -> (u32, Vec<PidGuard>) {
    let out = server.wait_output(id, token, "stdout", "the escapees' pids", &|t| {
        t.contains("double=")
    });
    let pgid = number_after(&out, "pgid=");
    let pids = [
        number_after(&out, "escapee="),
        number_after(&out, "double="),
    ];
    let guards: Vec<PidGuard> = pids.iter().map(|&p| PidGuard(p)).collect();
    for pid in pids {
        assert!(
            wait_until(Duration::from_secs(10), || process_alive(pid)
                && pgrp_of(pid) != pgid),
            "{pid} did not leave group {pgid}"
        );
    }
    (pgid, guards)
}

fn assert_all_gone(guards: &[PidGuard], cgroup: &TestCgroup, id: &str) {
    for guard in guards {
        assert!(
            wait_until(DEATH_TIMEOUT, || !process_alive(guard.0)),
            "escapee {} outlived its run",
            guard.0
        );
    }
    let run_cgroup = cgroup.0.join(format!("runbookd-{id}"));
    assert!(
        wait_until(DEATH_TIMEOUT, || !run_cgroup.exists()),
        "{} was not removed",
        run_cgroup.display()
    );
}

#[test]
#[ignore = "needs root and cgroup v2; CI runs it"]
fn setsid_escapees_die_with_a_timed_out_run() {
    let cgroup = TestCgroup::create();
    let server = Server::start(
        ServerOpts::new()
            .runbook("Escape.md", Runbook::new("Escape", ESCAPING))
            .env("RUN_CGROUP", &cgroup.path())
            .env("SCRIPT_TIMEOUT_SECONDS", "6")
            .env("CANCEL_GRACE_SECONDS", "1"),
    );
    let token = dev_token();
    let id = server.start_run("Escape.md", &token, json!({}));
    let (_, guards) = escapees(&server, &id, &token);
    assert!(
        cgroup.0.join(format!("runbookd-{id}")).is_dir(),
        "the run has no cgroup of its own"
    );
    let record = server.wait_finished(&id, &token, RUN_TIMEOUT);
    assert_eq!(record["status"], json!("timed_out"), "{record}");
    assert_all_gone(&guards, &cgroup, &id);
}

#[test]
#[ignore = "needs root and cgroup v2; CI runs it"]
fn setsid_escapees_die_with_a_cancelled_run() {
    let cgroup = TestCgroup::create();
    let server = Server::start(
        ServerOpts::new()
            .runbook("Escape.md", Runbook::new("Escape", ESCAPING))
            .env("RUN_CGROUP", &cgroup.path())
            .env("CANCEL_GRACE_SECONDS", "1"),
    );
    let token = dev_token();
    let id = server.start_run("Escape.md", &token, json!({}));
    let (_, guards) = escapees(&server, &id, &token);
    let resp = server.cancel(&id, &token);
    assert_eq!(resp.status, 202, "{}", resp.text());
    let record = server.wait_finished(&id, &token, RUN_TIMEOUT);
    assert_eq!(record["status"], json!("cancelled"), "{record}");
    assert_all_gone(&guards, &cgroup, &id);
}

#[test]
#[ignore = "needs root and cgroup v2; CI runs it"]
fn a_restart_kills_and_removes_the_cgroup_of_an_interrupted_run() {
    let cgroup = TestCgroup::create();
    let mut daemon = Daemon::start(
        &[("Escape.md", Runbook::new("Escape", ESCAPING).render())],
        &[("RUN_CGROUP", &cgroup.path())],
    );
    let token = dev_token();
    let id = daemon.start_run("Escape.md", &token, json!({}));
    let (pgid, guards) = escapees(&daemon, &id, &token);
    let _group = GroupGuard(pgid);
    let run_cgroup = format!("runbookd-{id}");
    assert!(
        wait_until(Duration::from_secs(10), || !child_cgroups(&cgroup)
            .iter()
            .all(|name| *name == run_cgroup)),
        "no run cgroup is made ahead"
    );
    let made_ahead: Vec<String> = child_cgroups(&cgroup)
        .into_iter()
        .filter(|name| *name != run_cgroup)
        .collect();
    daemon.kill9();
    for guard in &guards {
        assert!(process_alive(guard.0), "escapees outlive a killed server");
    }
    daemon.restart(&[]);
    let record = daemon.run_record(&id, &token);
    assert_eq!(record["status"], json!("interrupted"), "{record}");
    assert_all_gone(&guards, &cgroup, &id);
    let left = child_cgroups(&cgroup);
    let kept: Vec<&String> = made_ahead.iter().filter(|n| left.contains(n)).collect();
    assert!(
        kept.is_empty(),
        "cgroups the killed server made ahead are left: {kept:?}"
    );
}

/// The names of the cgroups directly in `cgroup`.
fn child_cgroups(cgroup: &TestCgroup) -> Vec<String> {
    fs::read_dir(&cgroup.0)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[ignore = "needs root and cgroup v2; CI runs it"]
fn setsid_escapees_die_when_the_script_exits() {
    let cgroup = TestCgroup::create();
    // The script exits once the test has seen the escapees alive.
    let script = ESCAPING.replace("sleep 300\n", "") + &wait_for_gate("GATE");
    let (server, token, gate, id) = start_gated_run(
        ServerOpts::new().env("RUN_CGROUP", &cgroup.path()),
        "Escape",
        &script,
    );
    let (_, guards) = escapees(&server, &id, &token);
    gate.open();
    let record = server.wait_finished(&id, &token, RUN_TIMEOUT);
    assert_eq!(record["status"], json!("succeeded"), "{record}");
    assert_all_gone(&guards, &cgroup, &id);
}

#[test]
#[ignore = "needs root and cgroup v2; CI runs it"]
fn setsid_escapees_die_at_shutdown() {
    let cgroup = TestCgroup::create();
    let mut daemon = Daemon::start(
        &[("Escape.md", Runbook::new("Escape", ESCAPING).render())],
        &[
            ("RUN_CGROUP", &cgroup.path()),
            ("SHUTDOWN_GRACE_SECONDS", "5"),
        ],
    );
    let token = dev_token();
    let id = daemon.start_run("Escape.md", &token, json!({}));
    let (pgid, guards) = escapees(&daemon, &id, &token);
    let _group = GroupGuard(pgid);
    daemon.sigterm();
    assert!(
        daemon.wait_exit(Duration::from_secs(30)).is_some(),
        "the server did not stop"
    );
    assert_eq!(
        stored_record(&daemon.runs_dir(), &id)["status"],
        json!("interrupted")
    );
    assert_all_gone(&guards, &cgroup, &id);
    assert_eq!(
        child_cgroups(&cgroup),
        Vec::<String>::new(),
        "a stopped server leaves no cgroup it made ahead"
    );
}

#[test]
#[ignore = "needs root and cgroup v2; CI runs it"]
fn a_stop_signal_removes_the_cgroups_made_ahead_before_the_runs_grace() {
    let cgroup = TestCgroup::create();
    // The run ignores SIGTERM, so the stop waits out its grace: a supervisor may kill the
    // server meanwhile, and the cgroups made ahead must be gone by then.
    let script = "trap '' TERM\necho started\nsleep 300\n";
    let mut daemon = Daemon::start(
        &[("Stubborn.md", Runbook::new("Stubborn", script).render())],
        &[
            ("RUN_CGROUP", &cgroup.path()),
            ("SHUTDOWN_GRACE_SECONDS", "30"),
        ],
    );
    let token = dev_token();
    let id = daemon.start_run("Stubborn.md", &token, json!({}));
    daemon.wait_output(&id, &token, "stdout", "its first line", &|t| {
        t.contains("started")
    });
    let run_cgroup = format!("runbookd-{id}");
    assert!(
        wait_until(Duration::from_secs(10), || child_cgroups(&cgroup)
            .iter()
            .any(|name| *name != run_cgroup)),
        "no run cgroup is made ahead"
    );
    daemon.sigterm();
    assert!(
        wait_until(Duration::from_secs(10), || child_cgroups(&cgroup)
            == vec![run_cgroup.clone()]),
        "the cgroups made ahead outlive the stop signal: {:?}",
        child_cgroups(&cgroup)
    );
    assert!(
        daemon.wait_exit(Duration::from_millis(500)).is_none(),
        "the server should still be waiting for its run"
    );
    // A supervisor cuts the grace short; the run's cgroup (and the run) go with the test's.
    daemon.kill9();
}
