//! History entries appended to the runbook file: layout, empty streams, escaped fences, the
//! per-stream size limit and the entry limit.

use std::time::Duration;

use serde_json::json;

use crate::util::*;

#[test]
fn entry_layout() {
    let rb = Runbook::new("Layout", "echo out\necho err >&2\nexit 2\n");
    let original = rb.render();
    let server = Server::start(ServerOpts::new().runbook("Layout.md", rb));
    let body = server.execute("Layout.md", &dev_token(), json!({})).json();
    let run_id = body["run_id"].as_str().unwrap().to_string();
    server.wait_for_history("Layout.md", 1, Duration::from_secs(5));
    let text = server.read_runbook("Layout.md");
    assert!(
        text.starts_with(&original),
        "the runbook above the new entry is unchanged:\n{text}"
    );
    let appended = &text[original.len()..];
    let rest = appended
        .strip_prefix("\n### ")
        .unwrap_or_else(|| panic!("entry starts with a blank line and ###: {appended:?}"));
    let (heading, rest) = rest.split_once('\n').unwrap();
    let parts: Vec<&str> = heading.split(" | ").collect();
    assert_eq!(parts.len(), 3, "{heading:?}");
    let time = parts[0];
    assert!(
        chrono::DateTime::parse_from_rfc3339(time).is_ok()
            && time.ends_with('Z')
            && time.len() == "2024-01-01T00:00:00.000Z".len(),
        "RFC 3339 with milliseconds and Z: {time:?}"
    );
    assert_eq!(parts[1], "Exit Code: 2");
    assert_eq!(parts[2], format!("Run: {run_id}"));
    let rest = rest
        .strip_prefix('\n')
        .unwrap_or_else(|| panic!("{rest:?}"));
    let stdout_at = rest.find("**Stdout:**\n```\nout\n").expect("stdout block");
    let stderr_at = rest.find("**Stderr:**\n```\nerr\n").expect("stderr block");
    assert_eq!(stdout_at, 0, "{rest:?}");
    assert!(stdout_at < stderr_at);
    assert!(rest.ends_with("```\n"), "{rest:?}");
    assert_eq!(rest.matches("```").count(), 4, "{rest:?}");
}

#[test]
fn empty_streams_are_left_out_and_fences_escaped() {
    let server = Server::start(
        ServerOpts::new()
            .runbook("OnlyOut.md", Runbook::new("OnlyOut", "echo only-out\n"))
            .runbook("OnlyErr.md", Runbook::new("OnlyErr", "echo only-err >&2\n"))
            .runbook(
                "Fence.md",
                Runbook::new("Fence", "echo '```'\necho '# History'\necho after\n"),
            ),
    );
    server.execute("OnlyOut.md", &dev_token(), json!({}));
    let e = &server.wait_for_history("OnlyOut.md", 1, Duration::from_secs(5))[0];
    assert!(
        e.contains("**Stdout:**") && !e.contains("**Stderr:**"),
        "{e}"
    );
    server.execute("OnlyErr.md", &dev_token(), json!({}));
    let e = &server.wait_for_history("OnlyErr.md", 1, Duration::from_secs(5))[0];
    assert!(
        !e.contains("**Stdout:**") && e.contains("**Stderr:**"),
        "{e}"
    );

    let body = server.execute("Fence.md", &dev_token(), json!({})).json();
    assert!(
        body["stdout"].as_str().unwrap().starts_with("```\n"),
        "the answer is raw"
    );
    let entries = server.wait_for_history("Fence.md", 1, Duration::from_secs(5));
    assert_eq!(entries.len(), 1, "{entries:?}");
    let e = &entries[0];
    let fence_lines = e.lines().filter(|l| l.trim_end() == "```").count();
    assert_eq!(fence_lines, 2, "only the block's own fences: {e}");
    assert!(e.contains("after"), "{e}");
    assert_eq!(entry_header(e).1, 0);
}

#[test]
fn history_output_is_limited_head_and_tail() {
    let script = "echo HEAD-MARKER\ni=0\nwhile [ $i -lt 300 ]; do echo \"filler line number $i\"; i=$((i+1)); done\necho TAIL-MARKER\n";
    let server = Server::start(
        ServerOpts::new()
            .runbook("Long.md", Runbook::new("Long", script))
            .env("HISTORY_OUTPUT_BYTES", "200"),
    );
    let body = server.execute("Long.md", &dev_token(), json!({})).json();
    let run_id = body["run_id"].as_str().unwrap().to_string();
    let stdout = body["stdout"].as_str().unwrap();
    assert!(
        stdout.contains("TAIL-MARKER") && stdout.len() > 5000,
        "answer not limited"
    );
    let e = &server.wait_for_history("Long.md", 1, Duration::from_secs(5))[0];
    assert!(e.contains("HEAD-MARKER"), "{e}");
    assert!(e.contains("TAIL-MARKER"), "{e}");
    assert!(e.contains("bytes omitted"), "{e}");
    assert!(e.matches(&run_id).count() >= 2, "marker names the run: {e}");
    assert!(!e.contains("filler line number 150"), "{e}");
    assert!(e.len() < 1500, "entry is limited: {} bytes", e.len());
}

#[test]
fn history_keeps_at_most_max_entries() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Many.md",
                Runbook::new("Many", "echo \"run $RUNBOOK_RUN_ID\"\n"),
            )
            .env("HISTORY_MAX_ENTRIES", "3"),
    );
    let mut ids = Vec::new();
    for _ in 0..5 {
        let body = server.execute("Many.md", &dev_token(), json!({})).json();
        ids.push(body["run_id"].as_str().unwrap().to_string());
    }
    // The last entry may be written just after the answer.
    let last = ids[4].clone();
    assert!(
        wait_until(Duration::from_secs(5), || server
            .history_entries("Many.md")
            .iter()
            .any(|e| entry_header(e).2.as_deref() == Some(last.as_str()))),
        "the last run's entry: {}",
        server.read_runbook("Many.md")
    );
    let entries = server.history_entries("Many.md");
    assert_eq!(entries.len(), 3, "{}", server.read_runbook("Many.md"));
    let kept: Vec<String> = entries.iter().map(|e| entry_header(e).2.unwrap()).collect();
    assert_eq!(
        kept,
        ids[2..].to_vec(),
        "the newest entries are kept, oldest first"
    );
    assert!(server
        .read_runbook("Many.md")
        .starts_with(&Runbook::new("Many", "echo \"run $RUNBOOK_RUN_ID\"\n").render()));
}
