//! A Server-Sent Events reader following the spec's parsing rules: lines end at LF, CRLF or
//! CR; `field: value` with one optional space removed; `data` lines joined with LF; comments
//! ignored; an event is dispatched at a blank line. Each event carries the time of the socket
//! read that completed it.
#![forbid(unsafe_code)]

use std::time::{Instant, SystemTime};

use crate::client::Connection;
use crate::error::BenchError;

/// One dispatched event.
pub struct Event<'a> {
    pub name: &'a str,
    pub id: Option<&'a str>,
    pub data: &'a [u8],
    /// When the read that completed this event returned (monotonic).
    pub at: Instant,
    /// The same moment on the wall clock.
    pub wall: SystemTime,
}

/// What the event handler wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Why reading ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The handler said stop (typically at `done`).
    Stopped,
    /// The body ended.
    BodyEnd,
}

/// The index of the first LF or CR, eight bytes at a time (the client must not be the
/// bottleneck of a throughput figure).
fn find_line_end(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const LFS: u64 = ONES * b'\n' as u64;
    const CRS: u64 = ONES * b'\r' as u64;
    let has_zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let words = bytes.chunks_exact(8);
    let tail_start = bytes.len() - words.remainder().len();
    for (i, word) in words.enumerate() {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(word);
        let v = u64::from_le_bytes(raw);
        if has_zero_byte(v ^ LFS) | has_zero_byte(v ^ CRS) != 0 {
            return word
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
                .map(|at| i * 8 + at);
        }
    }
    bytes[tail_start..]
        .iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .map(|at| tail_start + at)
}

/// Parser state between reads.
#[derive(Default)]
struct Parser {
    pending: Vec<u8>,
    name: String,
    id: Option<String>,
    data: Vec<u8>,
    has_data: bool,
    /// A CR ended the previous line; a LF right after it belongs to that terminator.
    after_cr: bool,
    /// How far into `pending` no line end was found (so long lines are scanned once).
    scanned: usize,
}

impl Parser {
    /// Handles every complete line in `pending`; stops early if the handler says so.
    fn process(
        &mut self,
        at: Instant,
        wall: SystemTime,
        on_event: &mut dyn FnMut(&Event<'_>) -> Result<Flow, BenchError>,
    ) -> Result<Flow, BenchError> {
        let mut pos = 0;
        let mut flow = Flow::Continue;
        while flow == Flow::Continue {
            if self.after_cr && pos < self.pending.len() {
                if self.pending[pos] == b'\n' {
                    pos += 1;
                }
                self.after_cr = false;
            }
            let from = self.scanned.max(pos);
            let Some(len) = find_line_end(&self.pending[from..]) else {
                self.scanned = self.pending.len();
                break;
            };
            let end = from + len;
            if self.pending[end] == b'\r' {
                self.after_cr = true;
            }
            let line_start = pos;
            pos = end + 1;
            if end == line_start {
                flow = self.dispatch(at, wall, on_event)?;
                continue;
            }
            let line = &self.pending[line_start..end];
            if line[0] == b':' {
                continue;
            }
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &b""[..]),
            };
            match field {
                b"data" => {
                    self.data.extend_from_slice(value);
                    self.data.push(b'\n');
                    self.has_data = true;
                }
                b"event" => self.name = String::from_utf8_lossy(value).into_owned(),
                b"id" => self.id = Some(String::from_utf8_lossy(value).into_owned()),
                _ => {}
            }
        }
        self.pending.drain(..pos);
        self.scanned = self.scanned.saturating_sub(pos);
        Ok(flow)
    }

    fn dispatch(
        &mut self,
        at: Instant,
        wall: SystemTime,
        on_event: &mut dyn FnMut(&Event<'_>) -> Result<Flow, BenchError>,
    ) -> Result<Flow, BenchError> {
        if !self.has_data {
            self.name.clear();
            return Ok(Flow::Continue);
        }
        self.data.pop();
        let name = if self.name.is_empty() {
            "message"
        } else {
            self.name.as_str()
        };
        let flow = on_event(&Event {
            name,
            id: self.id.as_deref(),
            data: &self.data,
            at,
            wall,
        })?;
        self.name.clear();
        self.data.clear();
        self.has_data = false;
        Ok(flow)
    }
}

/// Reads events from a connection whose head has been read, until the handler stops or the
/// body ends; `deadline` bounds the whole read.
pub fn follow(
    connection: &mut Connection,
    deadline: Instant,
    mut on_event: impl FnMut(&Event<'_>) -> Result<Flow, BenchError>,
) -> Result<Ending, BenchError> {
    let mut parser = Parser::default();
    loop {
        if Instant::now() > deadline {
            return Err(BenchError::Timeout("event stream still open".into()));
        }
        if !connection.read_body(&mut parser.pending)? {
            return Ok(Ending::BodyEnd);
        }
        let (at, wall) = (connection.last_read, connection.last_read_wall);
        if parser.process(at, wall, &mut on_event)? == Flow::Stop {
            return Ok(Ending::Stopped);
        }
    }
}

/// Parses a whole captured event stream (a client's output written to memory), handing each
/// event to `on_event`; events carry the time of this call.
pub fn parse_all(
    bytes: &[u8],
    mut on_event: impl FnMut(&Event<'_>) -> Result<Flow, BenchError>,
) -> Result<(), BenchError> {
    let mut parser = Parser {
        pending: bytes.to_vec(),
        ..Parser::default()
    };
    parser.process(Instant::now(), SystemTime::now(), &mut on_event)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_line_end() {
        assert_eq!(find_line_end(b""), None);
        assert_eq!(find_line_end(b"abcdefghijklmnop"), None);
        assert_eq!(find_line_end(b"abc\n"), Some(3));
        assert_eq!(find_line_end(b"abcdefgh\rij\n"), Some(8));
        assert_eq!(find_line_end(b"abcdefghijklmnopq\n"), Some(17));
        for at in 0..40 {
            let mut bytes = vec![b'x'; 40];
            bytes[at] = b'\n';
            assert_eq!(find_line_end(&bytes), Some(at));
            bytes[at] = 0x8a;
            assert_eq!(find_line_end(&bytes), None);
        }
    }

    #[test]
    fn parses_events_split_anywhere() {
        let stream = b"event: run\ndata: {}\n\n: keepalive\n\nevent: stdout\nid: 3\ndata: a\ndata: b\r\n\r\ndata:x\r\r";
        for split in 0..stream.len() {
            let mut parser = Parser::default();
            let mut seen = Vec::new();
            let now = (Instant::now(), SystemTime::now());
            for piece in [&stream[..split], &stream[split..]] {
                parser.pending.extend_from_slice(piece);
                parser
                    .process(now.0, now.1, &mut |e| {
                        seen.push((
                            e.name.to_string(),
                            e.id.map(str::to_string),
                            e.data.to_vec(),
                        ));
                        Ok(Flow::Continue)
                    })
                    .unwrap();
            }
            assert_eq!(
                seen,
                vec![
                    ("run".to_string(), None, b"{}".to_vec()),
                    (
                        "stdout".to_string(),
                        Some("3".to_string()),
                        b"a\nb".to_vec()
                    ),
                    ("message".to_string(), Some("3".to_string()), b"x".to_vec()),
                ],
                "split at {split}"
            );
        }
    }
}
