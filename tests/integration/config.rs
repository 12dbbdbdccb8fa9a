//! Start-up configuration: --help, refused values (exit status 2), the listening line, and the
//! compiled-in samples served when RUNBOOKS_DIR is unset.

use std::process::{Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

/// Runs the binary with `env` (on top of a clean environment) and waits up to 20 s for it to
/// exit; a process still running then is killed and reported as such.
fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> Output {
    let root = unique_root();
    let mut cmd = base_command();
    cmd.current_dir(&root)
        .args(args)
        .env("API_PORT", "0")
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("RUNBOOKS_DIR", root.join("runbooks"))
        .env("STATE_DIR", root.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::fs::create_dir_all(root.join("runbooks")).unwrap();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            let _ = std::fs::remove_dir_all(&root);
            panic!(
                "runbookd {args:?} with {env:?} did not exit; stdout {:?} stderr {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&root);
    out
}

#[test]
fn help_lists_the_variables() {
    let out = run_to_exit(&["--help"], &[("JWT_SECRET", TEST_SECRET)]);
    assert!(out.status.success(), "{out:?}");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for var in [
        "API_PORT",
        "BIND_ADDRESS",
        "RUNBOOKS_DIR",
        "STATE_DIR",
        "EXECUTION_DIR",
        "JWT_SECRET",
        "ENABLE_LOGIN",
        "MAX_OUTPUT_SIZE_BYTES",
        "HEARTBEAT_SECONDS",
        "ORPHAN_GRACE_MS",
        "SCRIPT_TIMEOUT_SECONDS",
        "MAX_RECURSION_DEPTH",
    ] {
        assert!(text.contains(var), "--help mentions {var}:\n{text}");
    }
    assert!(text.contains("8083"), "defaults are shown:\n{text}");
}

#[test]
fn bad_configuration_exits_with_status_2() {
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no JWT_SECRET", vec![]),
        ("short JWT_SECRET", vec![("JWT_SECRET", "too-short")]),
        (
            "placeholder JWT_SECRET",
            vec![("JWT_SECRET", "dev-secret-change-me")],
        ),
        (
            "bad API_PORT",
            vec![("JWT_SECRET", TEST_SECRET), ("API_PORT", "not-a-port")],
        ),
        (
            "port out of range",
            vec![("JWT_SECRET", TEST_SECRET), ("API_PORT", "70000")],
        ),
        (
            "bad HEARTBEAT_SECONDS",
            vec![("JWT_SECRET", TEST_SECRET), ("HEARTBEAT_SECONDS", "soon")],
        ),
        (
            "bad MAX_OUTPUT_SIZE_BYTES",
            vec![("JWT_SECRET", TEST_SECRET), ("MAX_OUTPUT_SIZE_BYTES", "-5")],
        ),
        (
            "bad ENABLE_LOGIN",
            vec![("JWT_SECRET", TEST_SECRET), ("ENABLE_LOGIN", "maybe")],
        ),
    ];
    for (what, env) in cases {
        let out = run_to_exit(&[], &env);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{what}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.trim().is_empty(), "{what}: an error line on stderr");
        assert!(
            !stderr.contains(TEST_SECRET),
            "{what}: the secret must not be printed"
        );
    }
}

#[test]
fn listening_line_is_printed_even_with_logging_off() {
    let server = Server::start(ServerOpts::new().env("RUST_LOG", "off"));
    assert_eq!(server.get("/healthz", None).status, 200);
}

#[test]
fn samples_are_served_without_runbooks_dir() {
    let server = Server::start(ServerOpts::new().without_runbooks_dir());
    let resp = server.get("/api/runbooks", Some(&dev_token()));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    let list = body["runbooks"].as_array().unwrap();
    assert!(list.len() >= 3, "several samples: {body}");
    let samples = server.state_dir().join("samples");
    assert!(samples.is_dir(), "samples copied to $STATE_DIR/samples");
    for r in list {
        let file = r["filename"].as_str().unwrap();
        assert!(samples.join(file).is_file(), "{file} in {samples:?}");
        let one = server.get(&format!("/api/runbooks/{file}"), Some(&dev_token()));
        assert_eq!(one.status, 200);
        let rq = server.get(
            &format!("/api/runbooks/{file}/required-env"),
            Some(&dev_token()),
        );
        assert_eq!(rq.status, 200);
    }
}
