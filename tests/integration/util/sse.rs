//! The tests' own SSE parser, independent of the server's and the client's code so that it
//! checks the framing: incremental, following the WHATWG event-stream rules, over a raw
//! streaming response.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{open, BodyRead, StreamingResponse};

/// One dispatched SSE event.
#[derive(Clone, Debug)]
pub struct SseEvent {
    /// The event type (`message` when no `event:` field was given).
    pub event: String,
    pub data: String,
    /// The event's own `id:` field, if it had one.
    pub id: Option<String>,
    /// When the bytes completing this event arrived.
    pub at: Instant,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| {
            panic!(
                "{} event data is not JSON ({e}): {:?}",
                self.event, self.data
            )
        })
    }

    pub fn numeric_id(&self) -> u64 {
        self.id
            .as_deref()
            .unwrap_or_else(|| panic!("{} event has no id: {self:?}", self.event))
            .parse()
            .unwrap_or_else(|_| panic!("{} event id is not a number: {self:?}", self.event))
    }
}

/// An incremental parser following the WHATWG event-stream interpretation rules.
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    event_type: String,
    data: String,
    event_id: Option<String>,
    /// The last event id buffer as the spec keeps it across events.
    pub last_event_id: String,
    /// Arrival times of comment lines (keepalives).
    pub comments: Vec<Instant>,
    /// Comment line texts, in order.
    pub comment_texts: Vec<String>,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Feeds bytes that arrived at `at`; returns the events they completed.
    pub fn feed(&mut self, bytes: &[u8], at: Instant) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(at, &mut out);
                }
                b'\n' => self.end_line(at, &mut out),
                _ => self.line.push(b),
            }
        }
        out
    }

    fn end_line(&mut self, at: Instant, out: &mut Vec<SseEvent>) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if line.is_empty() {
            if self.data.is_empty() {
                self.event_type.clear();
                self.event_id = None;
                return;
            }
            let mut data = std::mem::take(&mut self.data);
            if data.ends_with('\n') {
                data.pop();
            }
            let event = if self.event_type.is_empty() {
                "message".to_string()
            } else {
                std::mem::take(&mut self.event_type)
            };
            out.push(SseEvent {
                event,
                data,
                id: self.event_id.take(),
                at,
            });
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            self.comments.push(at);
            self.comment_texts.push(comment.to_string());
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
            None => (line.clone(), String::new()),
        };
        match field.as_str() {
            "event" => self.event_type = value,
            "data" => {
                self.data.push_str(&value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => {
                self.last_event_id = value.clone();
                self.event_id = Some(value);
            }
            _ => {}
        }
    }
}

/// A live SSE response: the HTTP stream plus a parser.
pub struct SseStream {
    pub resp: StreamingResponse,
    pub parser: SseParser,
    pending: VecDeque<SseEvent>,
    /// Every decoded body byte received so far.
    pub raw: Vec<u8>,
    /// Every event received so far.
    pub events: Vec<SseEvent>,
    ended: bool,
}

impl SseStream {
    pub fn new(resp: StreamingResponse) -> SseStream {
        SseStream {
            resp,
            parser: SseParser::new(),
            pending: VecDeque::new(),
            raw: Vec::new(),
            events: Vec::new(),
            ended: false,
        }
    }

    /// The next event, or None when the body ended or `timeout` passed (see `ended()`).
    pub fn next_event(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            if self.ended {
                return None;
            }
            match self.resp.next_body(deadline) {
                BodyRead::Data(bytes, at) => {
                    self.raw.extend_from_slice(&bytes);
                    let evs = self.parser.feed(&bytes, at);
                    self.events.extend(evs.iter().cloned());
                    self.pending.extend(evs);
                }
                BodyRead::End => self.ended = true,
                BodyRead::TimedOut => return None,
                BodyRead::Failed(e) => panic!("SSE stream failed: {e}"),
            }
        }
    }

    /// Whether the response body has ended.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Reads events until `done` (inclusive); panics if it does not come within `timeout`.
    pub fn until_done(&mut self, timeout: Duration) -> Vec<SseEvent> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left) {
                Some(ev) => {
                    let done = ev.event == "done";
                    got.push(ev);
                    if done {
                        return got;
                    }
                }
                None => panic!(
                    "no done event within {timeout:?} (ended: {}); events so far: {:?}\nraw tail: {:?}",
                    self.ended,
                    got.iter().map(|e| (&e.event, e.data.len())).collect::<Vec<_>>(),
                    String::from_utf8_lossy(&self.raw[self.raw.len().saturating_sub(600)..])
                ),
            }
        }
    }

    /// Reads until `done` and then until the body ends.
    pub fn until_end(&mut self, timeout: Duration) -> Vec<SseEvent> {
        let deadline = Instant::now() + timeout;
        let got = self.until_done(timeout);
        let left = deadline.saturating_duration_since(Instant::now());
        while !self.ended {
            if self.next_event(left).is_none() && !self.ended {
                panic!("the SSE body did not end after done within {timeout:?}");
            }
        }
        got
    }
}

/// Concatenated data of the events of one type.
pub fn joined(events: &[SseEvent], kind: &str) -> String {
    events
        .iter()
        .filter(|e| e.event == kind)
        .map(|e| e.data.as_str())
        .collect()
}

/// The JSON of the `done` event (which must be the last event).
pub fn done_json(events: &[SseEvent]) -> Value {
    let last = events.last().expect("no events");
    assert_eq!(last.event, "done", "last event is not done: {last:?}");
    last.json()
}

/// Lossy UTF-8 decoding with CR and CRLF turned into LF, as the SSE events carry output.
pub fn normalise(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .replace("\r\n", "\n")
        .replace('\r', "\n")
}

/// which must answer 200.
pub fn execute_sse_at(port: u16, file: &str, token: &str, env_vars: Value) -> SseStream {
    let auth = format!("Bearer {token}");
    let body = serde_json::to_vec(&json!({ "env_vars": env_vars })).unwrap();
    let resp = open(
        port,
        "HTTP/1.1",
        "POST",
        &format!("/api/runbooks/{file}/execute"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
        ],
        Some(&body),
    );
    assert_eq!(
        resp.status, 200,
        "SSE execute of {file} on port {port} answered {} {:?}",
        resp.status, resp.headers
    );
    SseStream::new(resp)
}
