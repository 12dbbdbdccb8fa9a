//! Secrets and privilege separation: a script cannot learn `JWT_SECRET` through `/proc` of its
//! ancestors, ptrace, `STATE_DIR` or its environment; with `RUN_AS_USER` it also cannot read run
//! logs, signal the server or write a runbook; runbookd refuses `RUN_AS_USER` it cannot honour;
//! a withheld variable never counts as available. The server-user tests copy the binary to a
//! 0755 directory and run it as nobody through setpriv, so they need root (CI runs them).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::*;

const NOBODY: u32 = 65534;
const SCRIPT_USER: &str = "runbookd-script";

/// Root, and setpriv to start runbookd as another user.
fn need_root_and_setpriv() {
    need_root("starts runbookd as another user");
    need_program("setpriv");
}

/// A secret nobody could guess or find by accident.
fn fresh_secret() -> String {
    format!(
        "trust-secret-{}-{}-0123456789abcdef",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
    )
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
}

/// runbookd started from a copy of the binary in a 0755 directory, as nobody through setpriv
/// (with `caps` as inheritable and ambient capabilities when given).
struct Staged {
    root: PathBuf,
    port: u16,
    child: Child,
    secret: String,
}

impl Staged {
    fn start(runbooks: &[(&str, String)], env: &[(&str, &str)], caps: Option<&str>) -> Staged {
        need_root_and_setpriv();
        let root = unique_root();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let bin_dir = root.join("bin");
        fs::create_dir_all(&bin_dir).unwrap();
        fs::set_permissions(&bin_dir, fs::Permissions::from_mode(0o755)).unwrap();
        let bin = bin_dir.join("runbookd");
        fs::copy(env!("CARGO_BIN_EXE_runbookd"), &bin).unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        for dir in ["state", "runbooks", "exec"] {
            let d = root.join(dir);
            fs::create_dir_all(&d).unwrap();
            fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
            chown(&d, NOBODY);
        }
        for (file, text) in runbooks {
            let p = root.join("runbooks").join(file);
            fs::write(&p, text).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
            chown(&p, NOBODY);
        }
        let secret = fresh_secret();
        let mut cmd = Command::new("setpriv");
        cmd.args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".to_string(),
        ]);
        if let Some(caps) = caps {
            cmd.arg(format!("--inh-caps={caps}"))
                .arg(format!("--ambient-caps={caps}"));
        }
        cmd.arg(&bin).current_dir(&root).env_clear();
        let dirs = [
            ("STATE_DIR", root.join("state")),
            ("RUNBOOKS_DIR", root.join("runbooks")),
            ("EXECUTION_DIR", root.join("exec")),
        ];
        for (name, dir) in &dirs {
            cmd.env(name, dir);
        }
        cmd.env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("API_PORT", "0")
            .env("BIND_ADDRESS", "127.0.0.1")
            .env("JWT_SECRET", &secret)
            .env("RUST_LOG", "warn")
            .env("SHUTDOWN_GRACE_SECONDS", "2");
        for (name, value) in env {
            cmd.env(name, value);
        }
        let (child, port) =
            spawn_listening(cmd, &root.join("server.stderr")).unwrap_or_else(|why| panic!("{why}"));
        Staged {
            root,
            port,
            child,
            secret,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn token(&self) -> String {
        sign_hs256(
            &claims("dev-only", json!(["developer"])),
            self.secret.as_bytes(),
        )
    }

    fn execute(&self, file: &str, env_vars: Value) -> Value {
        let auth = format!("Bearer {}", self.token());
        let body = serde_json::to_vec(&json!({ "env_vars": env_vars })).unwrap();
        let resp = request(
            self.port,
            "POST",
            &format!("/api/runbooks/{file}/execute"),
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            Some(&body),
        );
        assert_eq!(resp.status, 200, "execute {file}: {}", resp.text());
        resp.json()
    }

    fn call(&self, method: &str, path: &str) -> Response {
        let auth = format!("Bearer {}", self.token());
        request(self.port, method, path, &[("Authorization", &auth)], None)
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.root.join("server.stderr")).unwrap_or_default()
    }

    /// Every file below STATE_DIR that contains the secret (read as root).
    fn state_files_with_secret(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![self.root.join("state")];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if find(&fs::read(&path).unwrap_or_default(), self.secret.as_bytes())
                    .is_some()
                {
                    found.push(path);
                }
            }
        }
        found
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        stop_server(&mut self.child);
        if thread::panicking() {
            eprintln!("--- runbookd stderr ---\n{}\n--- end ---", self.stderr());
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// What a hostile script tries, each attempt announced by a `marker:` line.
const PROBE: &str = r#"#!/bin/bash
echo "marker: probe started as $(id -u):$(id -g) groups $(id -G)"
echo "marker: niceness $(nice)"
echo "--- own environment"
env
tr '\0' '\n' < /proc/$$/environ

probe_ptrace() {
    out=$(timeout 3 strace -qq -e trace=none -p "$1" -o /dev/null 2>&1)
    echo "marker: strace $1 rc=$? $out"
}
# env_start and env_end of a process (fields 50 and 51 of stat), 0 0 when not permitted.
env_block() {
    st=$(sed 's/^.*) //' "/proc/$1/stat")
    set -- $st
    echo "${48} ${49}"
}
read_env_block() {
    read -r es ee < <(env_block "$1")
    if [ "${es:-0}" -gt 0 ] && [ "${ee:-0}" -gt "$es" ]; then
        dd if=/proc/$1/mem bs=4096 iflag=skip_bytes,count_bytes skip=$es count=$((ee - es)) 2>&1 | tr '\0' '\n'
    else
        dd if=/proc/$1/mem bs=1 count=1 2>&1 | tr '\0' '\n'
    fi
}

# Control: a same-user process of our own is readable and traceable, so the probes work.
sleep 60 &
ctl=$!
sleep 0.2
if tr '\0' '\n' < /proc/$ctl/environ | grep -q '^RUNBOOK_RUN_ID='; then
    echo "marker: control environ readable"
fi
if read_env_block $ctl | grep -q '^RUNBOOK_RUN_ID='; then
    echo "marker: control mem readable"
fi
probe_ptrace $ctl
kill $ctl

p=$$
while :; do
    pp=$(awk '/^PPid:/ {print $2}' /proc/$p/status 2>/dev/null)
    if [ -z "$pp" ] || [ "$pp" -le 0 ]; then break; fi
    # The whole command line of the server; only the program of processes further up.
    if [ "$pp" = "$PPID" ]; then
        echo "marker: ancestor $pp $(tr '\0' ' ' < /proc/$pp/cmdline 2>&1 | head -c 2000)"
    else
        echo "marker: ancestor $pp $(tr '\0' '\n' < /proc/$pp/cmdline 2>&1 | head -n 1 | head -c 200)"
    fi
    echo "--- environ of $pp"
    tr '\0' '\n' < /proc/$pp/environ 2>&1 | head -c 200000
    echo "--- fd of $pp"
    ls -l /proc/$pp/fd/ 2>&1 | head -n 100
    echo "--- mem of $pp"
    read_env_block $pp | head -c 200000
    echo
    probe_ptrace $pp
    p=$pp
done

echo "marker: listing STATE_DIR"
ls -laR "$STATE_DIR" 2>&1 | head -n 300
cat "$STATE_DIR"/runs/*.json 2>&1 | head -c 100000
echo
if cat "$FIRST_LOG" > /dev/null 2>&1; then echo "marker: log read"; else echo "marker: log refused"; fi
if ls "$STATE_DIR" > /dev/null 2>&1; then echo "marker: state listed"; else echo "marker: state refused"; fi
if kill -0 "$PPID" 2> /dev/null; then echo "marker: kill allowed"; else echo "marker: kill refused"; fi
if echo x >> "$RUNBOOKS_DIR/Probe.md" 2> /dev/null; then echo "marker: runbook written"; else echo "marker: runbook refused"; fi
if touch "$RUNBOOKS_DIR/New.md" 2> /dev/null; then echo "marker: runbook created"; else echo "marker: runbook creation refused"; fi
# Leave something hard to clean up in the work directory.
mkdir -p deep/er && touch deep/er/f && chmod 0 deep/er deep
echo "marker: probe done"
"#;

fn probe_runbook() -> String {
    Runbook::new("Probe", PROBE)
        .env("FIRST_LOG", "log of an earlier run")
        .render()
}

fn first_runbook() -> String {
    Runbook::new("First", "echo first-run-output-0451\n").render()
}

/// The probe ran SCRIPT_NICE (5 by default) nicer than the server, which has the tests'
/// niceness: started directly or through the helper (`RUN_AS_USER`).
fn assert_nicer_than_the_server(text: &str) {
    let stat = fs::read_to_string("/proc/self/stat").unwrap();
    let own: i32 = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .nth(16)
        .unwrap()
        .parse()
        .unwrap();
    let niceness = format!("marker: niceness {}\n", (own + 5).min(19));
    assert!(text.contains(&niceness), "not {niceness:?}:\n{text}");
}

/// Runs First.md, then the probe with the first run's log path; returns the probe's output.
fn run_probe(server: &Staged) -> String {
    let first = server.execute("First.md", json!({}));
    assert_eq!(first["return_code"], json!(0), "{first}");
    let first_id = first["run_id"].as_str().unwrap().to_string();
    let first_log = server
        .root
        .join("state/runs")
        .join(format!("{first_id}.log"));
    assert!(first_log.is_file(), "no log at {}", first_log.display());
    let result = server.execute(
        "Probe.md",
        json!({ "FIRST_LOG": first_log.display().to_string() }),
    );
    let stdout = result["stdout"].as_str().unwrap_or_default();
    let stderr = result["stderr"].as_str().unwrap_or_default();
    let text = format!("{stdout}\n--- stderr\n{stderr}");
    assert!(
        text.contains("marker: probe done"),
        "probe did not finish:\n{text}"
    );
    text
}

/// The checks both modes share: the probes ran (controls prove they can read and trace a
/// same-user process), reached the server, and found no secret anywhere.
fn assert_secret_unreachable(server: &Staged, text: &str) {
    for marker in [
        "marker: control environ readable",
        "marker: control mem readable",
        "marker: listing STATE_DIR",
    ] {
        assert!(text.contains(marker), "missing {marker:?}:\n{text}");
    }
    let control_traced = text
        .lines()
        .any(|l| l.starts_with("marker: strace") && l.contains("rc=124"));
    assert!(
        control_traced,
        "strace could not trace the control process:\n{text}"
    );
    let server_pid = server.pid();
    assert!(
        text.contains(&format!("marker: ancestor {server_pid} ")),
        "the walk did not reach the server {server_pid}:\n{text}"
    );
    let server_strace = text
        .lines()
        .find(|l| l.starts_with(&format!("marker: strace {server_pid} ")))
        .unwrap_or_else(|| panic!("strace was not tried on the server:\n{text}"));
    assert!(
        !server_strace.contains("rc=124"),
        "the script could trace the server: {server_strace}"
    );
    assert!(
        !text.contains("JWT_SECRET="),
        "JWT_SECRET is in the script's reach:\n{text}"
    );
    assert!(
        !text.contains(&server.secret),
        "the secret leaked to the script:\n{text}"
    );
    assert_eq!(
        server.state_files_with_secret(),
        Vec::<PathBuf>::new(),
        "the secret is stored in STATE_DIR"
    );
}

#[test]
#[ignore = "needs root, setpriv and strace; CI runs it"]
fn a_same_user_script_cannot_reach_the_secret() {
    need_program("strace");
    let server = Staged::start(
        &[("First.md", first_runbook()), ("Probe.md", probe_runbook())],
        &[],
        None,
    );
    let text = run_probe(&server);
    assert!(
        text.contains(&format!("marker: probe started as {NOBODY}:{NOBODY}")),
        "{text}"
    );
    assert_secret_unreachable(&server, &text);
}

#[test]
#[ignore = "needs root and setpriv; CI runs it"]
fn the_server_is_not_dumpable() {
    let server = Staged::start(&[], &[], None);
    // As the server's own user: its environ is refused, while a plain process of that user
    // started the same way is readable (so the refusal is the server's doing).
    let out = Command::new("setpriv")
        .args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".to_string(),
            "sh".to_string(),
            "-c".to_string(),
            format!(
                "cat /proc/{}/environ > /dev/null; echo server=$?; \
                 sleep 30 & c=$!; sleep 0.2; cat /proc/$c/environ > /dev/null; echo control=$?; kill $c",
                server.pid()
            ),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("control=0"), "{stdout}{stderr}");
    assert!(stdout.contains("server=1"), "{stdout}{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
}

/// Creates the script user if it does not exist yet.
fn ensure_script_user() -> (u32, u32) {
    need_program("useradd");
    let id = |flag: &str| {
        Command::new("id")
            .args([flag, SCRIPT_USER])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
    };
    if id("-u").is_none() {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SCRIPT_USER,
            ])
            .output()
            .unwrap();
        // 9: created meanwhile by a parallel test.
        assert!(
            out.status.success() || out.status.code() == Some(9),
            "useradd failed: {out:?}"
        );
    }
    (
        id("-u").expect("script user uid"),
        id("-g").expect("script user gid"),
    )
}

const CAPS: &str = "+setuid,+setgid,+kill,+chown";

#[test]
#[ignore = "needs root, setpriv, strace and a second user; CI runs it"]
fn a_script_of_run_as_user_cannot_touch_the_server() {
    need_program("strace");
    let (uid, gid) = ensure_script_user();
    let server = Staged::start(
        &[
            ("First.md", first_runbook()),
            ("Probe.md", probe_runbook()),
            ("Sleep.md", Runbook::new("Sleep", "sleep 300\n").render()),
        ],
        &[("RUN_AS_USER", SCRIPT_USER)],
        Some(CAPS),
    );
    let probe_before = fs::read_to_string(server.root.join("runbooks/Probe.md")).unwrap();
    let text = run_probe(&server);
    assert!(
        text.contains(&format!(
            "marker: probe started as {uid}:{gid} groups {gid}\n"
        )),
        "not the script user with only its primary group:\n{text}"
    );
    assert_secret_unreachable(&server, &text);
    assert_nicer_than_the_server(&text);
    for marker in [
        "marker: log refused",
        "marker: state refused",
        "marker: kill refused",
        "marker: runbook refused",
        "marker: runbook creation refused",
    ] {
        assert!(text.contains(marker), "missing {marker:?}:\n{text}");
    }
    assert!(!text.contains("first-run-output-0451"), "{text}");
    let probe_after = fs::read_to_string(server.root.join("runbooks/Probe.md")).unwrap();
    assert!(
        probe_after.starts_with(&probe_before.replace("\n# History\n", "")),
        "the runbook was changed beyond its history"
    );
    assert!(!server.root.join("runbooks/New.md").exists());
    // Cleanup of the work directory the script user owned (with a chmod 0 tree) worked (it
    // happens once the result is out).
    let exec_dir = server.root.join("exec");
    let leftovers = || -> Vec<_> {
        fs::read_dir(&exec_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(30), || leftovers().is_empty()),
        "left behind: {:?}",
        leftovers()
    );

    // Cancelling reaches the script user's process group.
    let auth = format!("Bearer {}", server.token());
    let started = request(
        server.port,
        "POST",
        "/api/runbooks/Sleep.md/execute?async=true",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(b"{}"),
    );
    assert_eq!(started.status, 202, "{}", started.text());
    let run_id = started.json()["run_id"].as_str().unwrap().to_string();
    let cancel = server.call("DELETE", &format!("/api/runs/{run_id}"));
    assert!(
        cancel.status < 300,
        "cancel: {} {}",
        cancel.status,
        cancel.text()
    );
    let record = poll_until(
        Duration::from_secs(30),
        || server.call("GET", &format!("/api/runs/{run_id}")).json(),
        |r| !r["finished_at"].is_null(),
        |r| r.to_string(),
    );
    assert_eq!(record["status"], json!("cancelled"), "{record}");
}

/// Runs the staged-less binary as nobody through setpriv (no capabilities) and returns
/// (exit code, stderr).
fn start_as_nobody(env: &[(&str, &str)]) -> (Option<i32>, String) {
    need_root_and_setpriv();
    let root = unique_root();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    let bin = root.join("runbookd");
    fs::copy(env!("CARGO_BIN_EXE_runbookd"), &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let state = root.join("state");
    fs::create_dir_all(&state).unwrap();
    chown(&state, NOBODY);
    let mut cmd = Command::new("setpriv");
    cmd.args([
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".to_string(),
    ])
    .arg(&bin)
    .env_clear()
    .env("API_PORT", "0")
    .env("STATE_DIR", &state)
    // Its own secret: while it starts, setpriv (before it execs runbookd) is a dumpable process
    // of the same user as other tests' scripts, whose sweeps must not mistake it for theirs.
    .env("JWT_SECRET", fresh_secret());
    for (name, value) in env {
        cmd.env(name, value);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = fs::remove_dir_all(&root);
            panic!("runbookd kept running with {env:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let _ = fs::remove_dir_all(&root);
    (code, stderr)
}

#[test]
#[ignore = "needs root and setpriv; CI runs it"]
fn run_as_user_without_the_capabilities_refuses_to_start() {
    let (code, stderr) = start_as_nobody(&[("RUN_AS_USER", "4242:4242")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("RUN_AS_USER"), "{stderr}");
    assert!(stderr.contains("CAP_SETUID"), "{stderr}");
}

#[test]
fn run_as_user_that_does_not_exist_or_is_root_refuses_to_start() {
    for value in ["no-such-user-for-runbookd", "0:0"] {
        let root = unique_root();
        let out = base_command()
            .env("API_PORT", "0")
            .env("STATE_DIR", root.join("state"))
            .env("JWT_SECRET", TEST_SECRET)
            .env("RUN_AS_USER", value)
            .output()
            .unwrap();
        let _ = fs::remove_dir_all(&root);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("RUN_AS_USER"), "{stderr}");
    }
}

#[test]
fn a_withheld_variable_is_not_available() {
    let server = Server::start(
        ServerOpts::new()
            .env("SECRET_ENV_VARS", "MY_TOKEN")
            .env("MY_TOKEN", "value-of-my-token")
            .env("PLAIN_VAR", "plain")
            .runbook(
                "Needs.md",
                Runbook::new("Needs", "echo \"[$MY_TOKEN]\"\n")
                    .env("MY_TOKEN", "a withheld variable")
                    .env("JWT_SECRET", "the server's secret")
                    .env("PLAIN_VAR", "an ordinary one"),
            ),
    );
    let token = dev_token();
    let resp = server.get("/api/runbooks/Needs.md/required-env", Some(&token));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    let names = |key: &str| -> Vec<String> {
        body[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key} in {body}"))
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("available"), vec!["PLAIN_VAR"], "{body}");
    assert_eq!(names("missing"), vec!["MY_TOKEN", "JWT_SECRET"], "{body}");

    let resp = server.json_request(
        "PATCH",
        "/api/runbooks/Needs.md/validate",
        &token,
        &json!({}),
    );
    assert_eq!(resp.status, 400, "{}", resp.text());
    let text = resp.text();
    assert!(
        text.contains("missing required environment variable: MY_TOKEN"),
        "{text}"
    );
    assert!(
        text.contains("missing required environment variable: JWT_SECRET"),
        "{text}"
    );
    assert!(!text.contains("PLAIN_VAR"), "{text}");

    // A run refuses too, and the value never reaches the script.
    let result = server.execute("Needs.md", &token, json!({})).json();
    assert_ne!(result["return_code"], json!(0), "{result}");
    assert!(
        !result.to_string().contains("value-of-my-token"),
        "{result}"
    );
}

#[test]
#[ignore = "needs systemd-analyze; CI runs it"]
fn the_unit_with_run_as_user_enabled_verifies_and_is_rated() {
    need_program("systemd-analyze");
    let shipped =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/runbookd.service"))
            .unwrap();
    let caps = "CAP_SETUID CAP_SETGID CAP_KILL CAP_CHOWN";
    // Enabled as the unit's own comment says: the two empty capability lines replaced.
    assert!(shipped.contains(&format!("#   AmbientCapabilities={caps}\n")));
    let unit = shipped
        .replace(
            "ExecStart=/usr/local/bin/runbookd",
            &format!("ExecStart={}", env!("CARGO_BIN_EXE_runbookd")),
        )
        .replace(
            "\nCapabilityBoundingSet=\n",
            &format!("\nCapabilityBoundingSet={caps}\n"),
        )
        .replace(
            "\nAmbientCapabilities=\n",
            &format!("\nAmbientCapabilities={caps}\n"),
        );
    assert!(unit.contains(&format!("\nAmbientCapabilities={caps}\n")));
    let dir = unique_root();
    let path = dir.join("runbookd.service");
    fs::write(&path, unit).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = fs::remove_dir_all(&dir);
    let verify_text = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success() && verify_text.is_empty(),
        "{verify_text}"
    );
    let text = String::from_utf8_lossy(&security.stdout);
    let score: f64 = text
        .lines()
        .find(|l| l.contains("Overall exposure level for runbookd.service"))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level:\n{text}"));
    assert!(score <= 2.5, "exposure {score} (2.5 when written):\n{text}");
}

/// Sweeps the environment of every process it may read, for a few seconds, printing the
/// `JWT_SECRET=` and `RUNBOOK_RUN_ID=` entries it finds.
const WATCH: &str = r#"#!/bin/bash
end=$((SECONDS + 5))
scans=0
while [ $SECONDS -lt $end ]; do
    grep -a -o -h -E 'JWT_SECRET=[^[:cntrl:]]*|RUNBOOK_RUN_ID=[^[:cntrl:]]*' /proc/[0-9]*/environ 2> /dev/null
    scans=$((scans + 1))
done | sort -u
echo "marker: watch done"
"#;

#[test]
#[ignore = "needs root and setpriv; CI runs it"]
fn processes_being_started_never_show_the_secret() {
    let server = Staged::start(
        &[
            ("Watch.md", Runbook::new("Watch", WATCH).render()),
            ("Short.md", Runbook::new("Short", "sleep 0.1\n").render()),
        ],
        &[],
        None,
    );
    // While one script sweeps /proc, others are started: the moment between the server's
    // spawn and the helper's exec must not show the server's environment either.
    let (watch, others) = thread::scope(|scope| {
        let watcher = scope.spawn(|| server.execute("Watch.md", json!({})));
        assert!(
            wait_until(Duration::from_secs(30), || !pids_with_cmdline(
                "RUNBOOK_RUN_ID=[^"
            )
            .is_empty()),
            "the watcher never started sweeping /proc"
        );
        let mut others = Vec::new();
        for _ in 0..15 {
            let result = server.execute("Short.md", json!({}));
            others.push(result["run_id"].as_str().unwrap().to_string());
        }
        (watcher.join().unwrap(), others)
    });
    let text = format!("{}\n{}", watch["stdout"], watch["stderr"]);
    assert!(text.contains("marker: watch done"), "{text}");
    assert!(
        others
            .iter()
            .any(|id| text.contains(&format!("RUNBOOK_RUN_ID={id}"))),
        "the sweep saw none of the runs started meanwhile:\n{text}"
    );
    // Other tests start processes of the same user with secrets of their own at the same time
    // (setpriv is dumpable until it execs runbookd): only this server's secret counts.
    assert!(
        !text.contains(&format!("JWT_SECRET={}", server.secret)),
        "{text}"
    );
    assert!(!text.contains(&server.secret), "{text}");
}
