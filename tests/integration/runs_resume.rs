//! Watching runs through `/api/runs/{id}/events`: several viewers get the same bytes, a late
//! viewer replays and then follows, resuming after any id gives every later byte exactly once
//! (204 at or past `done`), `?tail=N`, viewers that stop reading, and the log size cap.

use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::runs_support::*;
use crate::util::*;

/// A script printing `out N` lines (and `err N` on stderr for every third), each its own write.
fn counting_script(from: u32, to: u32) -> String {
    format!(
        "i={from}\nwhile [ $i -le {to} ]; do\n  echo \"out $i é\"\n  \
         if [ $((i % 3)) -eq 0 ]; then echo \"err $i\" >&2; fi\n  sleep 0.01\n  i=$((i + 1))\ndone\n"
    )
}

fn counting_stdout(from: u32, to: u32) -> String {
    (from..=to).map(|i| format!("out {i} é\n")).collect()
}

fn counting_stderr(from: u32, to: u32) -> String {
    (from..=to)
        .filter(|i| i % 3 == 0)
        .map(|i| format!("err {i}\n"))
        .collect()
}

/// Output events with ids 1, 2, ... n and a final `done` with id n + 1; returns n.
fn assert_complete_numbering(events: &[SseEvent]) -> u64 {
    let out = outputs(events);
    let ids: Vec<u64> = out.iter().map(|o| o.0).collect();
    let expected: Vec<u64> = (1..=ids.len() as u64).collect();
    assert_eq!(ids, expected, "output event ids are the chunk numbers 1..n");
    let done = events.last().expect("no events");
    assert_eq!(done.event, "done");
    assert_eq!(done.numeric_id(), ids.len() as u64 + 1, "done id = n + 1");
    ids.len() as u64
}

#[test]
fn two_viewers_receive_identical_bytes() {
    let script = format!("{}{}", wait_for_gate("GATE"), counting_script(1, 60));
    let server = Server::start(
        ServerOpts::new()
            .runbook(
                "Count.md",
                Runbook::new("Count", &script).env("GATE", "gate"),
            )
            .env("HEARTBEAT_SECONDS", "300"),
    );
    let token = dev_token();
    let gate = Gate::new(&server.root, "count");
    let mut executor = server.execute_sse("Count.md", &token, json!({"GATE": gate.path()}));
    let run = executor.next_event(RUN_TIMEOUT).expect("the run event");
    assert_eq!(run.event, "run");
    let id = run.json()["run_id"].as_str().unwrap().to_string();
    let announce_len = find(&executor.raw, b"\n\n").unwrap() + 2;

    let mut first = server.attach(&id, &token, "", None);
    let mut second = server.attach(&id, &token, "", None);
    assert_eq!(first.resp.header("X-Run-Id"), Some(id.as_str()));
    gate.open();
    let a = first.until_end(RUN_TIMEOUT);
    let b = second.until_end(RUN_TIMEOUT);
    let c = executor.until_end(RUN_TIMEOUT);

    assert_eq!(stream_text(&outputs(&a), "stdout"), counting_stdout(1, 60));
    assert_eq!(stream_text(&outputs(&a), "stderr"), counting_stderr(1, 60));
    assert_complete_numbering(&a);
    assert!(outputs(&a).len() > 10, "the output came in many chunks");
    assert!(
        first.raw == second.raw,
        "the two viewers' bodies differ ({} vs {} bytes)",
        first.raw.len(),
        second.raw.len()
    );
    assert!(
        executor.raw[announce_len..] == first.raw[..],
        "the execute response (after its run event) differs from an attached viewer"
    );
    assert_eq!(done_json(&a), done_json(&c));
    assert_eq!(b.len(), a.len());
}

#[test]
fn late_viewer_replays_then_follows() {
    let script = format!(
        "{}{}{}",
        counting_script(1, 20),
        wait_for_gate("GATE"),
        counting_script(21, 40)
    );
    let (server, token, gate, id) = start_gated_run(ServerOpts::new(), "Late", &script);
    let first_part = counting_stdout(1, 20);
    server.wait_output(&id, &token, "stdout", "its first part", &|t| {
        t == first_part
    });

    // Attached after the first part was printed: it is replayed at once.
    let mut late = server.attach(&id, &token, "", None);
    let replay = events_until(&mut late, Duration::from_secs(20), "with out 20", &|e| {
        e.data.contains("out 20 ")
    });
    let replayed = outputs(&replay);
    assert_eq!(replayed[0].0, 1, "the replay starts at the first chunk");
    assert_eq!(stream_text(&replayed, "stdout"), first_part);
    // Then it waits with the run.
    assert!(
        late.next_event(Duration::from_millis(500)).is_none() && !late.ended(),
        "nothing more before the gate opens"
    );
    assert_eq!(server.run_record(&id, &token)["status"], json!("running"));

    gate.open();
    let opened = Instant::now();
    let rest = late.until_end(RUN_TIMEOUT);
    let followed = outputs(&rest);
    let first_live = rest.iter().find(|e| e.event == "stdout").unwrap();
    assert!(first_live.at >= opened);
    assert_eq!(stream_text(&followed, "stdout"), counting_stdout(21, 40));
    let all: Vec<SseEvent> = replay.into_iter().chain(rest).collect();
    assert_complete_numbering(&all);
    assert_eq!(
        stream_text(&outputs(&all), "stderr"),
        counting_stderr(1, 40)
    );
}

#[test]
fn resuming_a_finished_run_after_any_id_gives_every_later_byte_once() {
    let script = format!("{}printf 'partial line'\n", counting_script(1, 30));
    let server =
        Server::start(ServerOpts::new().runbook("Count.md", Runbook::new("Count", &script)));
    let token = dev_token();
    let resp = server.execute("Count.md", &token, json!({}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let id = resp.json()["run_id"].as_str().unwrap().to_string();

    let full = server.attach(&id, &token, "", None).until_end(RUN_TIMEOUT);
    let n = assert_complete_numbering(&full);
    let full_out = outputs(&full);
    assert_eq!(
        stream_text(&full_out, "stdout"),
        counting_stdout(1, 30) + "partial line"
    );
    assert_eq!(stream_text(&full_out, "stderr"), counting_stderr(1, 30));
    assert!(n > 20, "expected many chunks, got {n}");

    for k in 0..=n {
        let last = k.to_string();
        for (query, header) in [
            (String::new(), Some(last.as_str())),
            (format!("?after={k}"), None),
            // Last-Event-ID wins over ?after=.
            (format!("?after={}", (k + 7) % (n + 1)), Some(last.as_str())),
        ] {
            let resumed = server
                .attach(&id, &token, &query, header)
                .until_end(RUN_TIMEOUT);
            let got = outputs(&resumed);
            assert_eq!(
                got,
                full_out[k as usize..].to_vec(),
                "resume after {k} ({query:?}, Last-Event-ID {header:?})"
            );
            let done = resumed.last().unwrap();
            assert_eq!(done.event, "done");
            assert_eq!(done.numeric_id(), n + 1);
            assert_eq!(done.json(), done_json(&full));
            assert!(
                resumed.iter().all(|e| e.event != "run"),
                "no run event on /events"
            );
        }
    }

    // At or past done: 204, so an EventSource stops reconnecting.
    for (query, header) in [
        (String::new(), Some((n + 1).to_string())),
        (String::new(), Some((n + 50).to_string())),
        (format!("?after={}", n + 1), None),
        (String::from("?after=0"), Some((n + 1).to_string())),
    ] {
        let mut resp = server.open_events(&id, Some(&token), &query, header.as_deref());
        assert_eq!(resp.status, 204, "{query} {header:?}");
        assert!(resp.read_all(Duration::from_secs(10)).is_empty());
    }
    for (query, header) in [("", Some("abc")), ("?after=x", None)] {
        let resp = server.open_events(&id, Some(&token), query, header);
        assert_eq!(resp.status, 400, "{query} {header:?}");
    }
}

#[test]
fn resuming_a_live_run_gives_no_gap_and_no_duplicate() {
    let script = format!(
        "{}{}{}",
        counting_script(1, 30),
        wait_for_gate("GATE"),
        counting_script(31, 60)
    );
    let (server, token, gate, id) = start_gated_run(ServerOpts::new(), "Live", &script);

    // A viewer that drops its connection after `out 20`.
    let mut dropped = server.attach(&id, &token, "", None);
    let before_drop = events_until(&mut dropped, RUN_TIMEOUT, "with out 20", &|e| {
        e.data.contains("out 20 ")
    });
    // The id of the last event it handled (more may sit unread in its buffer).
    let k = outputs(&before_drop).last().unwrap().0;
    dropped.resp.disconnect();
    drop(dropped);

    // It resumes, while the run is still going, at the id it last saw; others resume at
    // other ids of the live run.
    let mut resumed = server.attach(&id, &token, "", Some(&k.to_string()));
    let mut others: Vec<(u64, SseStream)> = [0, 1, k / 2, k]
        .iter()
        .map(|&at| {
            (
                at,
                server.attach(&id, &token, &format!("?after={at}"), None),
            )
        })
        .collect();
    // stdout and stderr arrive through separate pipes, so either may come last.
    let mut first_part_rest = Vec::new();
    for needle in ["out 30 ", "err 30"] {
        if !first_part_rest
            .iter()
            .any(|e: &SseEvent| e.data.contains(needle))
        {
            first_part_rest.extend(events_until(&mut resumed, RUN_TIMEOUT, needle, &|e| {
                e.data.contains(needle)
            }));
        }
    }
    assert_eq!(
        outputs(&first_part_rest)[0].0,
        k + 1,
        "resumes right after {k}"
    );
    assert!(
        resumed.next_event(Duration::from_millis(300)).is_none() && !resumed.ended(),
        "the resumed viewer follows the live run"
    );
    gate.open();
    let rest = resumed.until_end(RUN_TIMEOUT);

    let mut all = before_drop;
    all.extend(first_part_rest);
    all.extend(rest);
    let n = assert_complete_numbering(&all);
    let all_out = outputs(&all);
    assert_eq!(stream_text(&all_out, "stdout"), counting_stdout(1, 60));
    assert_eq!(stream_text(&all_out, "stderr"), counting_stderr(1, 60));

    for (at, sse) in others.iter_mut() {
        let events = sse.until_end(RUN_TIMEOUT);
        assert_eq!(
            outputs(&events),
            all_out[*at as usize..].to_vec(),
            "viewer attached live after {at}"
        );
        assert_eq!(events.last().unwrap().numeric_id(), n + 1);
    }
}

#[test]
fn resuming_ahead_of_a_live_run_sends_only_later_chunks() {
    let script = format!(
        "echo one\nsleep 0.1\necho two\n{}for i in 3 4 5 6 7; do echo \"line $i\"; sleep 0.05; done\n",
        wait_for_gate("GATE")
    );
    let (server, token, gate, id) = start_gated_run(ServerOpts::new(), "Ahead", &script);
    server.wait_output(&id, &token, "stdout", "two lines", &|t| t == "one\ntwo\n");
    // Chunks 1 and 2 exist; a client says it has seen up to 4.
    let mut ahead = server.attach(&id, &token, "?after=4", None);
    gate.open();
    let events = ahead.until_end(RUN_TIMEOUT);
    let full = server.attach(&id, &token, "", None).until_end(RUN_TIMEOUT);
    let full_out = outputs(&full);
    assert_complete_numbering(&full);
    assert_eq!(
        outputs(&events),
        full_out[4..].to_vec(),
        "a viewer resuming after 4 got chunks it already had"
    );
}

/// The id of the chunk holding the start of the `lines`-th line from the end of the output
/// (one stream), or the first id when there are fewer lines.
fn expected_tail_start(out: &[Output], lines: usize) -> u64 {
    let text: Vec<u8> = out.iter().flat_map(|o| o.2.bytes()).collect();
    let mut starts = vec![0usize];
    for (i, b) in text.iter().enumerate() {
        if *b == b'\n' && i + 1 < text.len() {
            starts.push(i + 1);
        }
    }
    if lines >= starts.len() {
        return out[0].0;
    }
    let start = starts[starts.len() - lines];
    let mut offset = 0;
    for o in out {
        if start < offset + o.2.len() {
            return o.0;
        }
        offset += o.2.len();
    }
    unreachable!()
}

#[test]
fn tail_starts_at_the_chunk_holding_the_nth_line_from_the_end() {
    let script = "for i in 1 2 3 4 5 6; do echo \"line $i\"; sleep 0.1; done\n\
                  printf 'block a\\nblock b\\nblock c\\n'\nsleep 0.1\n\
                  printf 'partial'\n";
    let server = Server::start(ServerOpts::new().runbook("Tail.md", Runbook::new("Tail", script)));
    let token = dev_token();
    let id = server.execute("Tail.md", &token, json!({})).json()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let full = server.attach(&id, &token, "", None).until_end(RUN_TIMEOUT);
    let n = assert_complete_numbering(&full);
    let full_out = outputs(&full);
    assert_eq!(
        stream_text(&full_out, "stdout"),
        "line 1\nline 2\nline 3\nline 4\nline 5\nline 6\nblock a\nblock b\nblock c\npartial"
    );

    for lines in 1..=12usize {
        let events = server
            .attach(&id, &token, &format!("?tail={lines}"), None)
            .until_end(RUN_TIMEOUT);
        let got = outputs(&events);
        let start = expected_tail_start(&full_out, lines);
        assert_eq!(
            got,
            full_out[start as usize - 1..].to_vec(),
            "tail={lines}: expected to start at chunk {start}"
        );
        assert_eq!(events.last().unwrap().numeric_id(), n + 1);
    }
    // The documented cases, whatever the chunking: the last line alone; the block's chunk sent
    // whole when its middle line is asked for.
    let one = server
        .attach(&id, &token, "?tail=1", None)
        .until_end(RUN_TIMEOUT);
    assert_eq!(stream_text(&outputs(&one), "stdout"), "partial");
    let three = server
        .attach(&id, &token, "?tail=3", None)
        .until_end(RUN_TIMEOUT);
    let text = stream_text(&outputs(&three), "stdout");
    assert!(
        text.ends_with("block b\nblock c\npartial") && !text.contains("line 5"),
        "tail=3 gave {text:?}"
    );
}

#[test]
fn tail_of_a_live_run_then_follows() {
    let script = format!(
        "for i in 1 2 3 4 5; do echo \"line $i\"; sleep 0.05; done\n{}echo after\n",
        wait_for_gate("GATE")
    );
    let (server, token, gate, id) = start_gated_run(ServerOpts::new(), "Tail", &script);
    server.wait_output(&id, &token, "stdout", "line 5", &|t| {
        t.ends_with("line 5\n")
    });
    let mut sse = server.attach(&id, &token, "?tail=2", None);
    let head = events_until(&mut sse, RUN_TIMEOUT, "with line 5", &|e| {
        e.data.contains("line 5")
    });
    assert_eq!(stream_text(&outputs(&head), "stdout"), "line 4\nline 5\n");
    gate.open();
    let rest = sse.until_end(RUN_TIMEOUT);
    assert_eq!(stream_text(&outputs(&rest), "stdout"), "after\n");
}

/// Lines of 91 bytes (`%090g` of 1..=count, zero padded).
fn big_script(count: u32) -> String {
    format!(
        "{}seq -f '%090g' 1 {count}\necho big-done >&2\n",
        wait_for_gate("GATE")
    )
}

fn big_stdout(count: u32) -> String {
    (1..=count).map(|i| format!("{i:090}\n")).collect()
}

/// Reads a viewer to its end, returning its events (panics on a cut connection).
fn read_viewer(mut sse: SseStream) -> (Vec<SseEvent>, Instant) {
    let events = sse.until_end(Duration::from_secs(120));
    (events, Instant::now())
}

/// A 20 MB run (far more than the socket buffers of a viewer that does not read can take)
/// with one viewer that does not read and one that reads on a thread; output starts at
/// `opened`.
struct StalledSetup {
    count: u32,
    server: Server,
    token: String,
    id: String,
    stalled: StreamingResponse,
    reading: thread::JoinHandle<(Vec<SseEvent>, Instant)>,
    opened: Instant,
}

fn stalled_setup(viewer_stall_seconds: &str) -> StalledSetup {
    let count = 220_000;
    let (server, token, gate, id) = start_gated_run(
        ServerOpts::new().env("VIEWER_STALL_SECONDS", viewer_stall_seconds),
        "Big",
        &big_script(count),
    );
    let stalled = server.open_events(&id, Some(&token), "", None);
    assert_eq!(stalled.status, 200);
    let reader = server.attach(&id, &token, "", None);
    let reading = thread::spawn(move || read_viewer(reader));
    gate.open();
    StalledSetup {
        count,
        server,
        token,
        id,
        stalled,
        reading,
        opened: Instant::now(),
    }
}

#[test]
fn a_viewer_that_stops_reading_slows_neither_the_run_nor_another_viewer() {
    let StalledSetup {
        count,
        server,
        token,
        id,
        mut stalled,
        reading,
        opened,
    } = stalled_setup("60");

    // The run ends while the stalled viewer has read nothing and is still connected.
    let record = server.wait_finished(&id, &token, Duration::from_secs(90));
    let finished = opened.elapsed();
    assert_eq!(record["status"], json!("succeeded"), "{record}");
    let expected = big_stdout(count);
    assert_eq!(record["stdout_bytes"], json!(expected.len()));
    let (events, read_done) = reading.join().unwrap();
    assert_eq!(stream_text(&outputs(&events), "stdout"), expected);
    assert_eq!(stream_text(&outputs(&events), "stderr"), "big-done\n");
    assert!(
        finished < Duration::from_secs(45)
            && read_done.duration_since(opened) < Duration::from_secs(60),
        "run took {finished:?}, the reading viewer {:?}",
        read_done.duration_since(opened)
    );
    assert!(
        opened.elapsed() < Duration::from_secs(55),
        "too slow to tell the stalled viewer apart from one cut off after 60 s"
    );

    // The stalled viewer, reading at last, still gets everything.
    let mut parser = SseParser::new();
    let mut stdout = String::with_capacity(expected.len());
    let mut saw_done = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !saw_done {
        match stalled.next_body(deadline) {
            BodyRead::Data(bytes, at) => {
                for e in parser.feed(&bytes, at) {
                    match e.event.as_str() {
                        "stdout" => stdout.push_str(&e.data),
                        "done" => saw_done = true,
                        _ => {}
                    }
                }
            }
            other => panic!("the stalled viewer's stream ended early: {other:?}"),
        }
    }
    assert!(
        stdout == expected,
        "the late reader got {} of {} bytes",
        stdout.len(),
        expected.len()
    );
}

#[test]
fn a_stalled_viewer_is_cut_off_and_resumes_by_id() {
    let StalledSetup {
        count,
        server,
        token,
        id,
        mut stalled,
        reading,
        opened,
    } = stalled_setup("2");

    let expected = big_stdout(count);
    let record = server.wait_finished(&id, &token, Duration::from_secs(90));
    assert_eq!(record["status"], json!("succeeded"), "{record}");
    let (events, _) = reading.join().unwrap();
    assert!(
        stream_text(&outputs(&events), "stdout") == expected,
        "the reading viewer lost or repeated bytes"
    );

    // Stay stalled well past VIEWER_STALL_SECONDS; then the connection holds only what the
    // kernel buffered and ends without done.
    let stalled_for = Duration::from_secs(8);
    if opened.elapsed() < stalled_for {
        thread::sleep(stalled_for - opened.elapsed());
    }
    let (got, _) = drain_events(&mut stalled, Duration::from_secs(60));
    assert!(
        got.iter().all(|e| e.event != "done"),
        "the stalled viewer should have been cut off"
    );
    let got_out = outputs(&got);
    let got_stdout = stream_text(&got_out, "stdout");
    assert!(
        got_stdout.len() < expected.len() / 2,
        "the cut-off viewer received {} of {} bytes",
        got_stdout.len(),
        expected.len()
    );
    let last = got_out.last().map_or(0, |o| o.0);

    // It resumes from its last id and gets the rest exactly once.
    let rest = server
        .attach(&id, &token, "", Some(&last.to_string()))
        .until_end(Duration::from_secs(120));
    let rest_out = outputs(&rest);
    assert_eq!(rest_out.first().map(|o| o.0), Some(last + 1));
    let combined = got_stdout + &stream_text(&rest_out, "stdout");
    assert!(
        combined == expected,
        "cut + resumed: {} bytes, expected {}",
        combined.len(),
        expected.len()
    );
}

#[test]
fn the_log_cap_truncates_the_stored_output_but_not_the_run() {
    // 200 lines of 500 bytes: 100 000 bytes, ten times the cap.
    let script = "i=0\nwhile [ $i -lt 200 ]; do printf '%0499d\\n' $i; i=$((i + 1)); done\n\
                  echo after-cap >&2\nexit 4\n";
    let server = Server::start(
        ServerOpts::new()
            .runbook("Capped.md", Runbook::new("Capped", script))
            .env("RUN_LOG_MAX_BYTES", "10000"),
    );
    let token = dev_token();
    let expected: String = (0..200).map(|i| format!("{i:0499}\n")).collect();
    let mut sse = server.execute_sse("Capped.md", &token, json!({}));
    let events = sse.until_end(RUN_TIMEOUT);
    let id = events[0].json()["run_id"].as_str().unwrap().to_string();
    let notes: Vec<_> = events
        .iter()
        .filter(|e| e.event == "truncated")
        .map(|e| e.json())
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n["stream"] == json!("log") && n["limit"] == json!(10000)),
        "no truncated event for the log: {notes:?}"
    );
    let done = done_json(&events);
    assert_eq!(
        done["return_code"],
        json!(4),
        "the run went on to its end: {done}"
    );
    let streamed = stream_text(&outputs(&events), "stdout");
    assert!(
        streamed.len() <= 10000 && expected.starts_with(&streamed),
        "{} bytes streamed",
        streamed.len()
    );

    let record = server.run_record(&id, &token);
    assert_eq!(record["truncated"], json!(true), "{record}");
    assert_eq!(record["status"], json!("failed"), "{record}");
    assert_eq!(record["return_code"], json!(4), "{record}");
    assert_eq!(
        record["stdout_bytes"],
        json!(expected.len()),
        "further output is counted: {record}"
    );
    assert_eq!(
        record["stderr_bytes"],
        json!("after-cap\n".len()),
        "{record}"
    );

    // What is stored stops at the cap (stderr written later may have arrived earlier).
    let stored = server.call(
        "GET",
        &format!("/api/runs/{id}/logs/download"),
        Some(&token),
        &[],
        None,
    );
    assert_eq!(stored.status, 200);
    assert!(
        stored.body.len() <= 10000,
        "{} bytes stored",
        stored.body.len()
    );
    let stored_stdout = server.stored_output(&id, &token, "stdout");
    assert!(
        !stored_stdout.is_empty() && expected.starts_with(&stored_stdout),
        "the stored stdout is not the start of the output: {} bytes",
        stored_stdout.len()
    );
    // A replay says so too.
    let replay = server.attach(&id, &token, "", None).until_end(RUN_TIMEOUT);
    assert!(
        replay
            .iter()
            .any(|e| e.event == "truncated" && e.json()["stream"] == json!("log")),
        "the replay does not mention the cap"
    );
}
