//! Checks of the test fixtures themselves: the SSE parser and the raw HTTP client's body
//! framing, against canned input, so that a fixture bug cannot hide a server bug.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::*;

#[test]
fn sse_parser_follows_the_event_stream_rules() {
    let mut p = SseParser::new();
    let t = Instant::now();
    let input = b": comment one\n\
                  event: stdout\nid: 1\ndata: a\ndata: b\ndata: \n\n\
                  event:stderr\r\nid:2\r\ndata:x\r\n\r\n\
                  data: only data\r\rid: 3\ndata:  two spaces\n\n\
                  :keepalive\n\n\
                  event: nodata\n\n\
                  field-without-colon\ndata\n\n\
                  unknown: x\ndata: last\n\n";
    // Feed one byte at a time: CRLF split across feeds must not give an extra line.
    let mut events = Vec::new();
    for b in input.iter() {
        events.extend(p.feed(std::slice::from_ref(b), t));
    }
    let got: Vec<(String, String, Option<String>)> = events
        .iter()
        .map(|e| (e.event.clone(), e.data.clone(), e.id.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("stdout".into(), "a\nb\n".into(), Some("1".into())),
            ("stderr".into(), "x".into(), Some("2".into())),
            ("message".into(), "only data".into(), None),
            ("message".into(), " two spaces".into(), Some("3".into())),
            ("message".into(), "".into(), None),
            ("message".into(), "last".into(), None),
        ]
    );
    assert_eq!(p.comments.len(), 2);
    assert_eq!(
        p.comment_texts,
        vec![" comment one".to_string(), "keepalive".to_string()]
    );
    assert_eq!(p.last_event_id, "3");
}

#[test]
fn sse_joined_output_matches_normalised_bytes() {
    // What a server sends for chunks "a\r\nb\n" and "c" of stdout.
    let wire = b"event: stdout\nid: 5\ndata: a\ndata: b\ndata: \n\nevent: stdout\nid: 6\ndata: c\n\nevent: done\nid: 7\ndata: {\"return_code\":0}\n\n";
    let mut p = SseParser::new();
    let events = p.feed(wire, Instant::now());
    assert_eq!(joined(&events, "stdout"), normalise(b"a\r\nb\nc"));
    assert_eq!(done_json(&events), json!({"return_code": 0}));
    assert_eq!(events[2].numeric_id(), 7);
}

/// Serves one canned response on a local port and returns the port.
fn canned(response: Vec<u8>, pause_after: Option<usize>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let mut req = Vec::new();
        while find(&req, b"\r\n\r\n").is_none() {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                return;
            }
            req.extend_from_slice(&buf[..n]);
        }
        match pause_after {
            Some(at) => {
                s.write_all(&response[..at]).unwrap();
                s.flush().unwrap();
                thread::sleep(Duration::from_millis(400));
                s.write_all(&response[at..]).unwrap();
            }
            None => s.write_all(&response).unwrap(),
        }
    });
    port
}

#[test]
fn http_client_decodes_all_framings() {
    let port = canned(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello".to_vec(),
        None,
    );
    let r = request(port, "GET", "/", &[], None);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
    assert_eq!(r.header("x-a"), Some("b"));

    let port = canned(
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\n"
            .to_vec(),
        None,
    );
    let r = request(port, "GET", "/", &[], None);
    assert_eq!(r.status, 201);
    assert_eq!(r.text(), "abc0123456789abcdef");

    let port = canned(b"HTTP/1.0 200 OK\r\n\r\nuntil close".to_vec(), None);
    let r = request(port, "GET", "/", &[], None);
    assert_eq!(r.text(), "until close");
}

#[test]
fn streaming_client_reports_arrival_times() {
    let resp =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n2\r\nb\n\r\n0\r\n\r\n"
            .to_vec();
    let split = find(&resp, b"2\r\nb").unwrap();
    let port = canned(resp, Some(split));
    let mut s = open(port, "HTTP/1.1", "GET", "/", &[], None);
    assert!(s.is_chunked());
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = match s.next_body(deadline) {
        BodyRead::Data(d, at) => {
            assert_eq!(d, b"a");
            at
        }
        other => panic!("{other:?}"),
    };
    let second = match s.next_body(deadline) {
        BodyRead::Data(d, at) => {
            assert_eq!(d, b"b\n");
            at
        }
        other => panic!("{other:?}"),
    };
    assert!(second.duration_since(first) >= Duration::from_millis(300));
    assert!(matches!(s.next_body(deadline), BodyRead::End));
}

#[test]
fn history_helpers_split_entries() {
    let md = "# R\ntext\n\n# History\n\n### 2024-01-01T00:00:00.000Z | Exit Code: 3 | Run: r1-x\n\n**Stdout:**\n```\nout\n```\n\n### 2024-01-01T00:00:01.000Z | Exit Code: 403\n\nno\n";
    let entries = history_entries(md);
    assert_eq!(entries.len(), 2);
    assert_eq!(
        entry_header(&entries[0]),
        (
            "2024-01-01T00:00:00.000Z".to_string(),
            3,
            Some("r1-x".to_string())
        )
    );
    assert_eq!(entry_header(&entries[1]).1, 403);
    assert_eq!(
        parse_listening_line("listening on http://127.0.0.1:4321\n"),
        Some(4321)
    );
}
