//! Follows a run's event stream: prints `stdout`/`stderr` data exactly once to the given
//! sinks, resumes after a dropped connection from the last event id with a growing backoff,
//! and ends with the run's exit status and result taken from `done` (or from the run record
//! when the server answers 204 because everything was already seen).
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

use super::args::ServerArgs;
use super::reply::{error_message, exit_status_of, read_json};
use crate::client::http::{self, Request};
use crate::client::resume;
use crate::client::resume::RetryPolicy;
use crate::client::sse::SseEvent;
use crate::client::url::encode_segment;

/// Where the run's output goes.
pub struct Sinks<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
}

/// Why monitoring ended without the run's exit status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MonitorError {
    /// The server refused the request (401, 403, 404, ...); retrying cannot help.
    #[error("{0}")]
    Refused(String),
    /// No connection succeeded for the whole retry window.
    #[error("giving up after {} s without a connection ({last_error}); the run may still be going: runbookd monitor {run_id}", .waited.as_secs())]
    GaveUp {
        run_id: String,
        waited: Duration,
        last_error: String,
    },
    /// A reply this client does not understand.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    /// Writing the output to the terminal failed.
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
    /// The run ended but no return code was found.
    #[error("the run ended without a return code")]
    NoReturnCode,
}

impl MonitorError {
    pub fn exit_code(&self) -> u8 {
        match self {
            MonitorError::Refused(_) => 2,
            _ => 1,
        }
    }
}

/// A run followed to its end.
#[derive(Debug)]
pub struct Finished {
    /// The exit status for this process (see [`exit_status_of`]).
    pub code: u8,
    /// The `done` event's result object, or the run record after a 204.
    pub result: Value,
}

fn failed(reason: impl fmt::Display) -> Attempt {
    Attempt::failed(reason)
}

/// How one connection ended.
type Attempt = resume::Attempt<Finished>;

/// Statuses after which a new attempt may succeed.
fn is_retryable(status: u16) -> bool {
    matches!(status, 408 | 429 | 500..=599)
}

/// Follows the run until it ends and returns its exit status (`return_code & 255`, 1 for a
/// negative code) with its result.
pub fn monitor(
    server: &ServerArgs,
    run_id: &str,
    sinks: &mut Sinks<'_>,
    policy: &RetryPolicy,
) -> Result<Finished, MonitorError> {
    let mut follower = Follower {
        server,
        run_id,
        policy,
        resume_id: String::new(),
        truncation_notes: HashSet::new(),
    };
    resume::with_retries(
        policy,
        || follower.attempt(sinks),
        |waited, last_error| MonitorError::GaveUp {
            run_id: run_id.to_owned(),
            waited,
            last_error,
        },
    )
}

/// The state kept across connections.
struct Follower<'a> {
    server: &'a ServerArgs,
    run_id: &'a str,
    policy: &'a RetryPolicy,
    /// The id after the last handled event, sent as `Last-Event-ID`.
    resume_id: String,
    /// `truncated` events already reported: they carry no id, so a resumed stream can
    /// repeat them.
    truncation_notes: HashSet<String>,
}

impl Follower<'_> {
    fn authorization(&self) -> (&'static str, String) {
        ("Authorization", format!("Bearer {}", self.server.token))
    }

    /// Sends a request about the run: `Ok(Ok(response))` with one of the `expected` statuses,
    /// `Ok(Err(attempt))` when the attempt failed and may be retried (no connection, a retryable
    /// status), `Err` when the server refused it for good or answered something else.
    fn send(
        &self,
        request: &Request,
        expected: &[u16],
        what: &str,
    ) -> Result<Result<http::Response<BufReader<TcpStream>>, Attempt>, MonitorError> {
        let mut response = match http::send(&self.server.base, request, self.policy.timeouts) {
            Ok(response) => response,
            Err(e) => return Ok(Err(failed(e))),
        };
        match response.status {
            status if expected.contains(&status) => Ok(Ok(response)),
            status if is_retryable(status) => Ok(Err(failed(error_message(&mut response)))),
            400..=499 => Err(MonitorError::Refused(error_message(&mut response))),
            status => Err(MonitorError::Unexpected(format!(
                "HTTP {status} for {what}"
            ))),
        }
    }

    fn attempt(&mut self, sinks: &mut Sinks<'_>) -> Result<Attempt, MonitorError> {
        let mut headers = vec![
            self.authorization(),
            ("Accept", "text/event-stream".to_owned()),
            ("Cache-Control", "no-cache".to_owned()),
        ];
        headers.extend(resume::resume_header(&self.resume_id));
        let request = Request {
            method: "GET",
            target: self
                .server
                .base
                .target(&format!("/api/runs/{}/events", encode_segment(self.run_id))),
            headers,
            body: None,
        };
        let mut response = match self.send(&request, &[200, 204], "the event stream")? {
            Ok(response) if response.status == 204 => return self.fetch_exit_status(),
            Ok(response) => response,
            Err(attempt) => return Ok(attempt),
        };
        let content_type = response.header("content-type").unwrap_or_default();
        if !content_type
            .to_ascii_lowercase()
            .starts_with("text/event-stream")
        {
            return Err(MonitorError::Unexpected(format!(
                "content type {content_type:?} instead of an event stream"
            )));
        }
        self.follow_stream(&mut response, sinks)
    }

    fn follow_stream(
        &mut self,
        body: &mut dyn Read,
        sinks: &mut Sinks<'_>,
    ) -> Result<Attempt, MonitorError> {
        let mut resume_id = std::mem::take(&mut self.resume_id);
        let attempt =
            resume::follow_stream(body, &mut resume_id, self.policy.healthy_after, |event| {
                self.handle_event(event, sinks)
            });
        self.resume_id = resume_id;
        attempt
    }

    /// Acts on one event; `Some` once the run is done.
    fn handle_event(
        &mut self,
        event: &SseEvent,
        sinks: &mut Sinks<'_>,
    ) -> Result<Option<Finished>, MonitorError> {
        match event.event_type.as_str() {
            "stdout" => write_flushed(sinks.out, event.data.as_bytes())?,
            "stderr" => write_flushed(sinks.err, event.data.as_bytes())?,
            "truncated" => self.note_truncation(&event.data, sinks)?,
            "done" => {
                let result: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                return finished(result).map(Some);
            }
            _ => {}
        }
        Ok(None)
    }

    /// Reports a truncation on stderr, once per distinct event.
    fn note_truncation(&mut self, data: &str, sinks: &mut Sinks<'_>) -> Result<(), MonitorError> {
        if !self.truncation_notes.insert(data.to_owned()) {
            return Ok(());
        }
        write_flushed(sinks.err, truncation_note(data).as_bytes())
    }

    /// After a 204 (the run ended and everything was seen): its exit status from the record.
    fn fetch_exit_status(&self) -> Result<Attempt, MonitorError> {
        let request = Request {
            method: "GET",
            target: self
                .server
                .base
                .target(&format!("/api/runs/{}", encode_segment(self.run_id))),
            headers: vec![
                self.authorization(),
                ("Accept", "application/json".to_owned()),
            ],
            body: None,
        };
        let mut response = match self.send(&request, &[200], "the run record")? {
            Ok(response) => response,
            Err(attempt) => return Ok(attempt),
        };
        let record = match read_json(&mut response) {
            Ok(record) => record,
            Err(e) => return Ok(failed(e)),
        };
        finished(record).map(Attempt::Finished)
    }
}

fn finished(result: Value) -> Result<Finished, MonitorError> {
    let code = exit_status_of(&result).ok_or(MonitorError::NoReturnCode)?;
    Ok(Finished { code, result })
}

fn write_flushed(sink: &mut dyn Write, bytes: &[u8]) -> Result<(), MonitorError> {
    sink.write_all(bytes)
        .and_then(|()| sink.flush())
        .map_err(MonitorError::Output)
}

/// The stderr line for an `event: truncated`, with its `stream`, `limit` and `reason` when
/// given.
fn truncation_note(data: &str) -> String {
    let details: Value = serde_json::from_str(data).unwrap_or(Value::Null);
    let stream = details.get("stream").and_then(Value::as_str);
    let limit = details.get("limit").and_then(Value::as_u64);
    let mut note = "runbookd: output truncated".to_owned();
    match (stream, limit) {
        (Some(stream), Some(limit)) => {
            note.push_str(&format!(" ({stream} passed the limit of {limit} bytes)"));
        }
        (Some(stream), None) => note.push_str(&format!(" ({stream})")),
        _ => {}
    }
    if let Some(reason) = details.get("reason").and_then(Value::as_str) {
        note.push_str(&format!(": {reason}"));
    }
    note.push('\n');
    note
}

#[cfg(test)]
mod tests {
    use super::super::test_server::{
        chunk, quick_policy, serve, write_json_reply, Reply, SSE_HEAD_CHUNKED,
    };
    use super::*;
    use crate::client::url::BaseUrl;
    use std::time::Instant;

    fn server_args(url: &str) -> ServerArgs {
        ServerArgs {
            base: BaseUrl::parse(url).unwrap(),
            token: "tok".to_owned(),
        }
    }

    fn run_monitor(
        url: &str,
        run_id: &str,
        policy: &RetryPolicy,
    ) -> (Result<u8, MonitorError>, Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let result = monitor(
            &server_args(url),
            run_id,
            &mut Sinks {
                out: &mut out,
                err: &mut err,
            },
            policy,
        )
        .map(|finished| finished.code);
        (result, out, err)
    }

    #[test]
    fn resumes_after_a_drop_without_gaps_or_duplicates() {
        let first: Reply = Box::new(|request, stream| {
            assert_eq!(request.line, "GET /api/runs/r1-x/events HTTP/1.1");
            assert_eq!(request.header("authorization"), Some("Bearer tok"));
            assert_eq!(request.header("accept"), Some("text/event-stream"));
            assert_eq!(request.header("connection"), Some("close"));
            assert_eq!(request.header("last-event-id"), None);
            stream.write_all(SSE_HEAD_CHUNKED).unwrap();
            stream
                .write_all(&chunk(b"event: run\ndata: {\"run_id\":\"r1-x\"}\n\n"))
                .unwrap();
            stream
                .write_all(&chunk(
                    b"event: stdout\nid: 1\ndata: hel\xC3\xA9 \n\nevent: truncated\ndata: {\"stream\":\"stdout\",\"limit\":10}\n\nevent: stderr\nid: 2\ndata: warn\ndata: \n\nevent: stdout\nid: 3\ndata: wor",
                ))
                .unwrap();
            // The connection closes here, inside event 3 and without the last chunk.
        });
        let unavailable: Reply = Box::new(|request, stream| {
            assert_eq!(request.header("last-event-id"), Some("2"));
            stream
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        });
        let resumed: Reply = Box::new(|request, stream| {
            assert_eq!(request.header("last-event-id"), Some("2"));
            // Close-delimited this time, as an HTTP/1.0 upstream would send it.
            stream
                .write_all(
                    b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\r\n",
                )
                .unwrap();
            stream
                .write_all(b"event: run\ndata: {}\n\n: keepalive\n\nevent: stdout\r\nid: 3\r\ndata: world\r\ndata: \r\n\r\n")
                .unwrap();
            stream
                .write_all(b"event: truncated\ndata: {\"stream\":\"stdout\",\"limit\":10}\n\n")
                .unwrap();
            stream
                .write_all(b"event: done\nid: 4\ndata: {\"return_code\":259,\"stdout\":\"x\"}\n\n")
                .unwrap();
        });
        let server = serve(vec![first, unavailable, resumed]);
        let (result, out, err) = run_monitor(&server.url, "r1-x", &quick_policy());
        let requests = server.finish();
        assert_eq!(requests.len(), 3);
        assert_eq!(result.unwrap(), 3);
        assert_eq!(String::from_utf8(out).unwrap(), "helé world\n");
        assert_eq!(
            String::from_utf8(err).unwrap(),
            "runbookd: output truncated (stdout passed the limit of 10 bytes)\nwarn\n",
            "the id-less truncated event replayed after the resume is reported once"
        );
    }

    #[test]
    fn no_content_means_the_record_gives_the_exit_status() {
        let events: Reply = Box::new(|_, stream| {
            stream
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .unwrap();
        });
        let record: Reply = Box::new(|request, stream| {
            assert_eq!(request.line, "GET /api/runs/r1-y HTTP/1.1");
            assert_eq!(request.header("authorization"), Some("Bearer tok"));
            let body = br#"{"success":true,"run_id":"r1-y","return_code":256}"#;
            write_json_reply(stream, "200 OK", "", body);
        });
        let server = serve(vec![events, record]);
        let (result, out, err) = run_monitor(&server.url, "r1-y", &quick_policy());
        assert_eq!(server.finish().len(), 2);
        assert_eq!(result.unwrap(), 0);
        assert!(out.is_empty() && err.is_empty());
    }

    #[test]
    fn refusals_are_not_retried() {
        for status in [401, 403, 404] {
            let reply: Reply = Box::new(move |_, stream| {
                let body = br#"{"success":false,"error":"run not visible"}"#;
                write_json_reply(stream, &format!("{status} X"), "", body);
            });
            let server = serve(vec![reply]);
            let (result, _, _) = run_monitor(&server.url, "r1-z", &quick_policy());
            let error = result.unwrap_err();
            assert_eq!(error.exit_code(), 2);
            assert_eq!(
                error.to_string(),
                format!("run not visible (HTTP {status})")
            );
            assert_eq!(server.finish().len(), 1);
        }
    }

    #[test]
    fn negative_return_code_exits_1() {
        let reply: Reply = Box::new(|_, stream| {
            stream.write_all(SSE_HEAD_CHUNKED).unwrap();
            stream
                .write_all(&chunk(
                    b"event: done\nid: 1\ndata: {\"return_code\":-15}\n\n",
                ))
                .unwrap();
            stream.write_all(b"0\r\n\r\n").unwrap();
        });
        let server = serve(vec![reply]);
        let (result, _, _) = run_monitor(&server.url, "r1-n", &quick_policy());
        server.finish();
        assert_eq!(result.unwrap(), 1);
    }

    #[test]
    fn gives_up_when_nothing_answers() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let policy = RetryPolicy {
            give_up_after: Duration::from_millis(300),
            ..quick_policy()
        };
        let started = Instant::now();
        let (result, _, _) = run_monitor(&url, "r1-q", &policy);
        let error = result.unwrap_err();
        assert!(matches!(error, MonitorError::GaveUp { .. }), "{error}");
        assert_eq!(error.exit_code(), 1);
        assert!(error.to_string().contains("runbookd monitor r1-q"));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[test]
    fn connections_that_bring_nothing_new_do_not_count_as_success() {
        let replies: Vec<Reply> = (0..1000)
            .map(|_| -> Reply {
                Box::new(|_, stream| {
                    stream.write_all(SSE_HEAD_CHUNKED).unwrap();
                    stream
                        .write_all(&chunk(b"event: run\ndata: {}\n\n: keepalive\n\nevent: stdout\nid: 1\ndata: never complete"))
                        .unwrap();
                })
            })
            .collect();
        let server = serve(replies);
        let policy = RetryPolicy {
            give_up_after: Duration::from_millis(300),
            ..quick_policy()
        };
        let started = Instant::now();
        let (result, out, _) = run_monitor(&server.url, "r1-l", &policy);
        assert!(matches!(result, Err(MonitorError::GaveUp { .. })));
        assert!(out.is_empty());
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(server);
    }

    #[test]
    fn a_stream_that_is_not_sse_is_an_error() {
        let reply: Reply = Box::new(|_, stream| {
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\nhi",
                )
                .unwrap();
        });
        let server = serve(vec![reply]);
        let (result, _, _) = run_monitor(&server.url, "r1-h", &quick_policy());
        server.finish();
        assert!(matches!(result, Err(MonitorError::Unexpected(_))));
    }

    #[test]
    fn truncation_notes() {
        assert_eq!(
            truncation_note("{\"stream\":\"stderr\"}"),
            "runbookd: output truncated (stderr)\n"
        );
        assert_eq!(truncation_note("x"), "runbookd: output truncated\n");
        assert_eq!(
            truncation_note(r#"{"stream":"log","limit":5,"reason":"log full"}"#),
            "runbookd: output truncated (log passed the limit of 5 bytes): log full\n"
        );
    }
}
