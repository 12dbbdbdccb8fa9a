//! systemd/runbookd.service and its env example under test: the unit's settings, the example
//! against runbookd's settings, and systemd-analyze verify and security of the unit.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::*;

use super::*;

// systemd
// ---------------------------------------------------------------------------------------------

/// `(key, value)` pairs of the `[Service]` section of the shipped unit, in order.
pub(crate) fn unit_service_settings() -> Vec<(String, String)> {
    let unit = shipped("systemd/runbookd.service");
    let mut section = String::new();
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if section == "[Service]" {
            let (k, v) = line.split_once('=').expect("key=value");
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// `(name, value, commented)` of the variable lines of the example environment file.
fn env_example() -> Vec<(String, String, bool)> {
    shipped("systemd/runbookd.env.example")
        .lines()
        .filter_map(|line| {
            let (commented, rest) = match line.strip_prefix('#') {
                Some(rest) => (true, rest),
                None => (false, line),
            };
            let (name, value) = rest.split_once('=')?;
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            valid.then(|| (name.to_string(), value.to_string(), commented))
        })
        .collect()
}

#[test]
fn systemd_unit_settings() {
    let settings = unit_service_settings();
    let get = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> String {
        let values = get(key);
        assert_eq!(values.len(), 1, "{key}: {values:?}");
        values[0].to_string()
    };
    assert_eq!(one("ExecStart"), "/usr/local/bin/runbookd");
    assert_eq!(one("Type"), "exec");
    assert_eq!(one("DynamicUser"), "yes");
    assert_eq!(one("StateDirectory"), "runbookd");
    assert_eq!(one("EnvironmentFile"), "-/etc/runbookd/runbookd.env");
    assert!(get("Environment").contains(&"RUST_LOG=info"));
    assert_eq!(one("KillMode"), "mixed");
    assert_eq!(one("Restart"), "on-failure");

    // Stopping waits longer than runbookd's own shutdown grace.
    let grace: u64 = env_example()
        .iter()
        .find(|(n, _, _)| n == "SHUTDOWN_GRACE_SECONDS")
        .map(|(_, v, _)| v.parse().unwrap())
        .unwrap_or(10);
    let stop: u64 = one("TimeoutStopSec").parse().unwrap();
    assert!(
        stop >= grace + 10,
        "TimeoutStopSec {stop} vs SHUTDOWN_GRACE_SECONDS {grace}"
    );

    let nofile = one("LimitNOFILE");
    let hard: u64 = nofile.rsplit(':').next().unwrap().parse().unwrap();
    assert!(hard >= 65536, "LimitNOFILE {nofile}");

    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictNamespaces", "yes"),
        ("SystemCallArchitectures", "native"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(one(key), value, "{key}");
    }
    assert!(!get("ReadWritePaths").is_empty());
    // Runs get their own cgroups in the delegated subtree; ProtectControlGroups=yes would make
    // it read-only.
    assert_eq!(one("Delegate"), "yes");
    assert!(get("ProtectControlGroups").is_empty());

    // Ordinary scripts keep the network.
    for key in ["PrivateNetwork", "IPAddressDeny", "MemoryDenyWriteExecute"] {
        assert!(get(key).is_empty(), "{key} would break ordinary scripts");
    }
    let families = one("RestrictAddressFamilies");
    for family in ["AF_UNIX", "AF_INET", "AF_INET6"] {
        assert!(
            families.split_whitespace().any(|f| f == family),
            "{families}"
        );
    }
}

#[test]
fn systemd_env_example_matches_runbookd_settings() {
    let help = base_command().arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let vars = env_example();
    assert!(vars.iter().any(|(n, _, c)| n == "JWT_SECRET" && !c));
    for (name, _, _) in &vars {
        let known = name == "RUST_LOG"
            || help
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name.as_str()));
        assert!(
            known,
            "{name} in runbookd.env.example is not a runbookd setting:\n{help}"
        );
    }

    // As shipped (no secret) runbookd refuses to start, with the configuration error status.
    let root = unique_root();
    let mut cmd = base_command();
    cmd.current_dir(&root)
        .env("STATE_DIR", root.join("state"))
        .env("API_PORT", "0");
    for (name, value, commented) in &vars {
        if !commented && name != "API_PORT" {
            cmd.env(name, value);
        }
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("JWT_SECRET"),
        "{}",
        output_text(&out)
    );
    let _ = fs::remove_dir_all(&root);

    // With a secret, the example's values are accepted.
    let mut opts = ServerOpts::new();
    for (name, value, commented) in &vars {
        let fixture_owned = ["JWT_SECRET", "API_PORT", "BIND_ADDRESS"].contains(&name.as_str());
        if !commented && !fixture_owned {
            opts = opts.env(name, value);
        }
    }
    let server = Server::start(opts.runbook("Hello.md", Runbook::new("Hello", "echo hi\n")));
    assert_eq!(server.get("/healthz", None).status, 200);
}

fn unit_for_this_build(dir: &Path) -> PathBuf {
    let unit = shipped("systemd/runbookd.service");
    let unit = replace_once(
        &unit,
        "ExecStart=/usr/local/bin/runbookd",
        &format!("ExecStart={}", env!("CARGO_BIN_EXE_runbookd")),
    );
    let path = dir.join("runbookd.service");
    fs::write(&path, unit).unwrap();
    path
}

#[test]
#[ignore = "needs systemd-analyze; CI runs it"]
fn systemd_analyze_verifies_the_unit_silently() {
    let analyze = need_program("systemd-analyze");
    let dir = unique_root();
    let unit = unit_for_this_build(&dir);
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let text = output_text(&out);
    let _ = fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    assert_eq!(text, "", "systemd-analyze verify printed something");
}

#[test]
#[ignore = "needs systemd-analyze; CI runs it"]
fn systemd_analyze_security_rates_the_unit() {
    let analyze = need_program("systemd-analyze");
    let dir = unique_root();
    let unit = unit_for_this_build(&dir);
    let out = Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = output_text(&out);
    let version = Command::new(analyze).arg("--version").output().unwrap();
    let _ = fs::remove_dir_all(&dir);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level for runbookd.service"))
        .unwrap_or_else(|| panic!("no overall exposure level:\n{text}"));
    let score: f64 = overall
        .rsplit(':')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no score in {overall:?}"));
    println!(
        "systemd-analyze security: {} ({})",
        overall
            .trim_start_matches(|c: char| !c.is_alphanumeric())
            .trim(),
        String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("")
    );
    assert!(
        score <= 2.5,
        "exposure {score} (1.9 with Delegate=yes and without ProtectControlGroups):\n{text}"
    );
}
