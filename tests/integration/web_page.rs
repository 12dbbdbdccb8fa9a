//! The API additions the web page needs: the runbook list's `description` and `problems`
//! (read without side effects), the page's files with their Content-Security-Policy, signed
//! download links, the opt-in JSON chunk format that keeps CRs, and `script_started`.

use std::time::Instant;

use serde_json::{json, Value};

use crate::util::*;

fn events_of(body: &[u8]) -> Vec<SseEvent> {
    SseParser::new().feed(body, Instant::now())
}

#[test]
fn runbook_list_reports_format_problems_without_side_effects() {
    let good = Runbook::new("Good", "echo ok\n").env("TARGET", "where to go");
    let broken = "# Broken\nHalf a runbook.\n# Environment Requirements\n```yaml\nBASH_ENV: x\n```\n# Script\n```sh\necho hi\n```\n";
    let server = Server::start(
        ServerOpts::new()
            .runbook("Good.md", good)
            .file("Broken.md", broken.as_bytes()),
    );
    let before_good = server.read_runbook("Good.md");
    let before_broken = server.read_runbook("Broken.md");
    let token = dev_token();
    let list = server.get("/api/runbooks", Some(&token));
    assert_eq!(list.status, 200, "{}", list.text());
    let list = list.json();
    let item = |file: &str| -> Value {
        list["runbooks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["filename"] == file)
            .cloned()
            .unwrap_or_else(|| panic!("{file} not listed: {list}"))
    };
    // TARGET is missing on the server: not a format problem.
    assert_eq!(item("Good.md")["problems"], json!([]), "{list}");
    assert_eq!(
        item("Good.md")["description"],
        "A runbook written by the integration tests."
    );
    assert_eq!(item("Broken.md")["description"], "Half a runbook.");
    let problems: Vec<String> = serde_json::from_value(item("Broken.md")["problems"].clone())
        .expect("problems is a list of strings");
    assert!(
        problems.iter().any(|p| p.contains("# History")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("BASH_ENV")),
        "{problems:?}"
    );
    // Nothing written anywhere: no History entry, no run.
    assert_eq!(server.read_runbook("Good.md"), before_good);
    assert_eq!(server.read_runbook("Broken.md"), before_broken);
    let runs = server.get("/api/runs", Some(&token)).json();
    assert_eq!(runs["runs"], json!([]), "{runs}");
}

#[test]
fn page_files_are_served_with_a_strict_content_security_policy() {
    let server = Server::start(ServerOpts::new());
    let csp = "default-src 'self'; script-src 'self'";
    for (path, kind) in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/app.css", "text/css"),
    ] {
        let resp = server.get(path, None);
        assert_eq!(resp.status, 200, "{path}");
        assert_eq!(resp.header("Content-Security-Policy"), Some(csp), "{path}");
        assert!(
            resp.header("Content-Type")
                .is_some_and(|t| t.starts_with(kind)),
            "{path}: {:?}",
            resp.header("Content-Type")
        );
        assert!(!resp.body.is_empty(), "{path}");
    }
    // Nothing in the page that the policy would block: scripts and styles come from files.
    let html = server.get("/", None).text();
    assert!(html.contains("<script src=\"/app.js\""), "{html}");
    assert!(html.contains("href=\"/app.css\""), "{html}");
    for inline in ["<style", " style=", " onclick=", " onload=", "javascript:"] {
        assert!(!html.contains(inline), "the page has {inline:?}");
    }
    assert_eq!(html.matches("<script").count(), 1, "{html}");
    for external in ["http://", "https://", "//fonts."] {
        assert!(!html.contains(external), "the page loads {external}");
    }
}

/// A finished run of `file`, its id.
fn finished_run(server: &Server, file: &str, token: &str) -> String {
    let resp = server.execute(file, token, json!({}));
    assert!(resp.status == 200 || resp.status == 500, "{}", resp.text());
    resp.json()["run_id"].as_str().unwrap().to_string()
}

fn mint(server: &Server, run: &str, token: &str, query: &str) -> (u16, Value) {
    let resp = server.json_request(
        "POST",
        &format!("/api/runs/{run}/download-link{query}"),
        token,
        &json!({}),
    );
    (resp.status, resp.json())
}

fn hmac_sig(parts: &[&str]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(TEST_SECRET.as_bytes()).unwrap();
    for p in parts {
        mac.update(p.as_bytes());
        mac.update(b"\n");
    }
    b64url(&mac.finalize().into_bytes())
}

#[test]
fn a_signed_link_downloads_one_run_log_for_sixty_seconds() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Hello.md",
                Runbook::new("Hello", "echo hello\necho oops >&2\n"),
            )
            .runbook("Other.md", Runbook::new("Other", "echo other\n")),
    );
    let token = dev_token();
    let run = finished_run(&server, "Hello.md", &token);
    let other = finished_run(&server, "Other.md", &token);

    let (status, link) = mint(&server, &run, &token, "");
    assert_eq!(status, 200, "{link}");
    let url = link["url"].as_str().unwrap().to_string();
    assert!(
        url.starts_with(&format!("/api/runs/{run}/logs/download?")),
        "{url}"
    );
    assert!(!url.contains(&token), "the link carries the token");
    let expires = chrono::DateTime::parse_from_rfc3339(link["expires_at"].as_str().unwrap())
        .unwrap()
        .timestamp();
    let ttl = expires - now_secs();
    assert!((55..=61).contains(&ttl), "valid for {ttl} s");

    // Works without a token, within its time.
    let got = server.get(&url, None);
    assert_eq!(got.status, 200, "{}", got.text());
    // Two pipes: their order is the reader threads', so compare the lines as a set.
    let mut lines: Vec<String> = got.text().lines().map(String::from).collect();
    lines.sort();
    assert_eq!(lines, ["hello", "oops"], "{}", got.text());
    assert!(got
        .header("Content-Disposition")
        .is_some_and(|d| d.contains("attachment")));

    // A stream's link gives that stream only, and its signature is not valid for both.
    let (_, link) = mint(&server, &run, &token, "?stream=stderr");
    let stderr_url = link["url"].as_str().unwrap().to_string();
    assert_eq!(server.get(&stderr_url, None).text(), "oops\n");
    let widened = stderr_url.replace("&stream=stderr", "");
    assert_eq!(server.get(&widened, None).status, 401);

    // Not for another run.
    let query = url.split_once('?').unwrap().1;
    let elsewhere = server.get(&format!("/api/runs/{other}/logs/download?{query}"), None);
    assert_eq!(elsewhere.status, 401, "{}", elsewhere.text());

    // Not for any other route of the same run.
    for path in [
        format!("/api/runs/{run}?{query}"),
        format!("/api/runs/{run}/logs?{query}"),
        format!("/api/runs/{run}/events?{query}"),
        format!("/api/runbooks?{query}"),
    ] {
        assert_eq!(server.get(&path, None).status, 401, "{path}");
    }

    // A later expiry with the old signature is refused; an expired, correctly signed one too.
    let exp = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("exp="))
        .unwrap();
    let stretched = url.replace(&format!("exp={exp}"), &format!("exp={}", expires + 3600));
    assert_eq!(server.get(&stretched, None).status, 401);
    let past = now_secs() - 5;
    let sig = hmac_sig(&["runbookd-log-download-v1", &run, &past.to_string(), ""]);
    let expired = server.get(
        &format!("/api/runs/{run}/logs/download?exp={past}&sig={sig}"),
        None,
    );
    assert_eq!(expired.status, 401, "{}", expired.text());
    assert!(expired.text().contains("expired"), "{}", expired.text());
    // The same forging with a future expiry proves the test's signing matches the server's.
    let future = now_secs() + 30;
    let sig = hmac_sig(&["runbookd-log-download-v1", &run, &future.to_string(), ""]);
    let fresh = server.get(
        &format!("/api/runs/{run}/logs/download?exp={future}&sig={sig}"),
        None,
    );
    assert_eq!(fresh.status, 200, "{}", fresh.text());

    // Minting needs a token that may see the run.
    let anonymous = server.request("POST", &format!("/api/runs/{run}/download-link"), &[], None);
    assert_eq!(anonymous.status, 401);
    // The query token still works for other clients.
    let with_query = server.get(
        &format!("/api/runs/{run}/logs/download?access_token={token}"),
        None,
    );
    assert_eq!(with_query.status, 200);
}

#[test]
fn the_json_format_keeps_carriage_returns_and_the_default_stream_is_unchanged() {
    let script = "printf 'step 1\\rstep 2\\rdone\\n'\nprintf 'err\\r\\n' >&2\n";
    let server = Server::start(ServerOpts::new().runbook("Cr.md", Runbook::new("Cr", script)));
    let token = dev_token();
    let run = finished_run(&server, "Cr.md", &token);

    let plain = server.get(&format!("/api/runs/{run}/events"), Some(&token));
    let events = events_of(&plain.body);
    assert_eq!(joined(&events, "stdout"), "step 1\nstep 2\ndone\n");
    assert_eq!(joined(&events, "stderr"), "err\n");
    assert!(done_json(&events)["stdout"].is_string(), "{}", plain.text());

    let framed = server.get(&format!("/api/runs/{run}/events?format=json"), Some(&token));
    let events = events_of(&framed.body);
    let text = |kind: &str| -> String {
        events
            .iter()
            .filter(|e| e.event == kind)
            .map(|e| {
                let data = e.json();
                assert_eq!(data["seq"].as_u64(), Some(e.numeric_id()), "{data}");
                data["text"].as_str().unwrap().to_string()
            })
            .collect()
    };
    assert_eq!(text("stdout"), "step 1\rstep 2\rdone\n");
    assert_eq!(text("stderr"), "err\r\n");
    let done = done_json(&events);
    assert_eq!(done["run_id"], run.as_str());
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["script_started"], true);
    assert!(done.get("stdout").is_none(), "{done}");

    // Resuming in the JSON format skips what was seen.
    let first = events.iter().find(|e| e.event == "stdout").unwrap();
    let resumed = server.request(
        "GET",
        &format!("/api/runs/{run}/events?format=json"),
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Last-Event-ID", &first.numeric_id().to_string()),
        ],
        None,
    );
    let resumed = events_of(&resumed.body);
    assert!(resumed
        .iter()
        .filter(|e| e.event == "stdout" || e.event == "stderr")
        .all(|e| e.numeric_id() > first.numeric_id()));

    // The SSE execute takes the same option.
    let auth = format!("Bearer {token}");
    let live = server.request(
        "POST",
        "/api/runbooks/Cr.md/execute?stream=true&format=json",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(b"{}"),
    );
    let events = events_of(&live.body);
    assert_eq!(events[0].event, "run");
    let stdout: String = events
        .iter()
        .filter(|e| e.event == "stdout")
        .map(|e| e.json()["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stdout, "step 1\rstep 2\rdone\n");
}

#[test]
fn a_run_that_failed_validation_reads_as_not_started() {
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Needs.md",
                Runbook::new("Needs", "echo $TARGET\n").env("TARGET", "where"),
            )
            .runbook("Fine.md", Runbook::new("Fine", "exit 3\n")),
    );
    let token = dev_token();
    let run = finished_run(&server, "Needs.md", &token);
    let record = server.get(&format!("/api/runs/{run}"), Some(&token)).json();
    assert_eq!(record["status"], "failed", "{record}");
    assert_eq!(record["script_started"], false, "{record}");
    assert!(
        record["errors"][0]
            .as_str()
            .is_some_and(|e| e.contains("missing required environment variable: TARGET")),
        "{record}"
    );
    assert!(record["error"]
        .as_str()
        .is_some_and(|e| e.starts_with("validation failed")));

    let run = finished_run(&server, "Fine.md", &token);
    // The synchronous answer comes after the record is final.
    let record = server.get(&format!("/api/runs/{run}"), Some(&token)).json();
    assert_eq!(record["script_started"], true, "{record}");
    assert_eq!(record["return_code"], 3, "{record}");
    assert_eq!(record["errors"], json!([]), "{record}");
    // Listed the same way.
    let list = server.get("/api/runs", Some(&token)).json();
    assert!(list["runs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["script_started"].is_boolean()));
}
