//! An incremental Server-Sent Events parser following the WHATWG event-stream rules: bytes
//! arrive in arbitrary pieces, lines end with CRLF, LF or CR, `event`/`data`/`id` fields
//! build an event, a blank line dispatches it, `:` lines are comments, and an event still
//! open when the stream ends is never dispatched.
#![forbid(unsafe_code)]

use std::ops::ControlFlow;

/// The index of the first LF or CR, eight bytes at a time (the client must not be the
/// bottleneck of the benchmark's throughput figure).
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

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, `message` when absent.
    pub event_type: String,
    /// The `data:` lines joined with "\n".
    pub data: String,
    /// The last event id once this event is dispatched: what to send as `Last-Event-ID`
    /// after having handled it.
    pub last_event_id: String,
}

/// Appends `bytes` as text, invalid UTF-8 replaced by U+FFFD.
fn push_lossy(text: &mut String, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(valid) => text.push_str(valid),
        Err(_) => text.push_str(&String::from_utf8_lossy(bytes)),
    }
}

/// A dispatched event as `SseParser::feed_each` hands it over, borrowed from the parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEventRef<'a> {
    /// The `event:` field, `message` when absent.
    pub event_type: &'a str,
    /// The `data:` lines joined with "\n".
    pub data: &'a str,
    /// The last event id once this event is dispatched.
    pub last_event_id: &'a str,
}

impl SseEventRef<'_> {
    /// The event as an owned value.
    pub fn to_owned(&self) -> SseEvent {
        SseEvent {
            event_type: self.event_type.to_owned(),
            data: self.data.to_owned(),
            last_event_id: self.last_event_id.to_owned(),
        }
    }
}

/// Parser state for one connection.
#[derive(Debug)]
pub struct SseParser {
    /// Bytes of the line being read.
    line: Vec<u8>,
    /// The previous line ended with CR: an LF right after it belongs to that line end.
    skip_lf: bool,
    /// No line completed yet, so a leading byte order mark is still to be removed.
    at_stream_start: bool,
    event_type: String,
    data: String,
    id_buffer: String,
}

impl SseParser {
    /// A parser for a new connection. The id buffer starts from the id remembered from the
    /// previous connection, so an event without an `id:` field (such as `run`) cannot make a
    /// later resume start over from the beginning.
    pub fn resuming(last_event_id: String) -> Self {
        SseParser {
            line: Vec::new(),
            skip_lf: false,
            at_stream_start: true,
            event_type: String::new(),
            data: String::new(),
            id_buffer: last_event_id,
        }
    }

    /// Feeds the next bytes of the stream and returns the events they complete, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        let _ = self.feed_each(bytes, |event| {
            events.push(event.to_owned());
            ControlFlow::Continue(())
        });
        events
    }

    /// Feeds the next bytes of the stream and hands each event they complete to `on_event`,
    /// in order, without copying it. Once `on_event` breaks, the rest of `bytes` is dropped
    /// and the parser is not to be fed again.
    pub fn feed_each(
        &mut self,
        mut bytes: &[u8],
        mut on_event: impl FnMut(&SseEventRef<'_>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        if self.skip_lf && !bytes.is_empty() {
            self.skip_lf = false;
            if bytes[0] == b'\n' {
                bytes = &bytes[1..];
            }
        }
        while let Some(end) = find_line_end(bytes) {
            let mut pending = std::mem::take(&mut self.line);
            let line = if pending.is_empty() {
                &bytes[..end]
            } else {
                pending.extend_from_slice(&bytes[..end]);
                &pending[..]
            };
            let flow = self.process_line(line, &mut on_event);
            pending.clear();
            self.line = pending;
            flow?;
            let terminator = bytes[end];
            bytes = &bytes[end + 1..];
            if terminator == b'\r' {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
        }
        self.line.extend_from_slice(bytes);
        ControlFlow::Continue(())
    }

    /// One line, without its end. Read as bytes: a field name or the colon cannot hide in an
    /// invalid UTF-8 sequence, so only the value needs decoding (lossily).
    fn process_line(
        &mut self,
        mut line: &[u8],
        on_event: &mut impl FnMut(&SseEventRef<'_>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        if self.at_stream_start {
            self.at_stream_start = false;
            line = line.strip_prefix("\u{FEFF}".as_bytes()).unwrap_or(line);
        }
        if line.is_empty() {
            return self.dispatch(on_event);
        }
        if line[0] == b':' {
            return ControlFlow::Continue(());
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => {
                self.event_type.clear();
                push_lossy(&mut self.event_type, value);
            }
            b"data" => {
                push_lossy(&mut self.data, value);
                self.data.push('\n');
            }
            b"id" if !value.contains(&0) => {
                self.id_buffer.clear();
                push_lossy(&mut self.id_buffer, value);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn dispatch(
        &mut self,
        on_event: &mut impl FnMut(&SseEventRef<'_>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        if self.data.is_empty() {
            self.event_type.clear();
            return ControlFlow::Continue(());
        }
        self.data.pop();
        let flow = on_event(&SseEventRef {
            event_type: if self.event_type.is_empty() {
                "message"
            } else {
                &self.event_type
            },
            data: &self.data,
            last_event_id: &self.id_buffer,
        });
        self.event_type.clear();
        self.data.clear();
        flow
    }

    /// The id to send as `Last-Event-ID` when no event was dispatched on this connection.
    #[cfg(test)]
    pub fn id_buffer(&self) -> &str {
        &self.id_buffer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: &str, data: &str, id: &str) -> SseEvent {
        SseEvent {
            event_type: event_type.to_owned(),
            data: data.to_owned(),
            last_event_id: id.to_owned(),
        }
    }

    fn parse_all(pieces: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::resuming(String::new());
        pieces.iter().flat_map(|p| parser.feed(p)).collect()
    }

    const STREAM: &str = "event: run\ndata: {\"run_id\":\"r1-x\"}\n\n\
        : keepalive\n\n\
        event: stdout\nid: 1\ndata: a\ndata: b\ndata: \n\n\
        event:stderr\r\nid:2\r\ndata:  two spaces\r\n\r\n\
        event: stdout\rid: 3\rdata: é€😀\rdata\r\r\
        event: done\nid: 4\ndata: {\"return_code\":0}\n\n";

    fn expected() -> Vec<SseEvent> {
        vec![
            event("run", "{\"run_id\":\"r1-x\"}", ""),
            event("stdout", "a\nb\n", "1"),
            event("stderr", " two spaces", "2"),
            event("stdout", "é€😀\n", "3"),
            event("done", "{\"return_code\":0}", "4"),
        ]
    }

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
    fn feed_each_hands_borrowed_events_and_stops_on_break() {
        let mut parser = SseParser::resuming("4".to_owned());
        let mut seen = Vec::new();
        let flow = parser.feed_each(
            b"event: run\ndata: {}\n\nid: 5\ndata: a\n\ndata: b\n\n",
            |e| {
                seen.push(e.to_owned());
                if e.data == "a" {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        );
        assert_eq!(flow, ControlFlow::Break(()));
        assert_eq!(
            seen,
            vec![event("run", "{}", "4"), event("message", "a", "5")]
        );
    }

    #[test]
    fn parses_a_whole_stream() {
        assert_eq!(parse_all(&[STREAM.as_bytes()]), expected());
    }

    #[test]
    fn parses_when_split_at_every_byte_position() {
        let bytes = STREAM.as_bytes();
        for split in 0..=bytes.len() {
            let (first, second) = bytes.split_at(split);
            assert_eq!(parse_all(&[first, second]), expected(), "split at {split}");
        }
    }

    #[test]
    fn parses_one_byte_at_a_time() {
        let pieces: Vec<&[u8]> = STREAM.as_bytes().chunks(1).collect();
        assert_eq!(parse_all(&pieces), expected());
    }

    #[test]
    fn crlf_split_between_cr_and_lf_is_one_line_end() {
        let events = parse_all(&[b"data: x\r", b"\ndata: y\r", b"\n\r", b"\n"]);
        assert_eq!(events, vec![event("message", "x\ny", "")]);
    }

    #[test]
    fn a_trailing_partial_event_is_discarded() {
        assert!(parse_all(&[b"event: stdout\nid: 9\ndata: never"]).is_empty());
        assert!(parse_all(&[b"event: stdout\nid: 9\ndata: never\n"]).is_empty());
        let mut parser = SseParser::resuming("5".to_owned());
        assert!(parser.feed(b"id: 6\ndata: x\n").is_empty());
        assert_eq!(parser.id_buffer(), "6");
    }

    #[test]
    fn comments_and_unknown_fields_are_ignored() {
        let events = parse_all(&[b":comment\n: another\nretry: 10\nfoo: bar\ndata: d\n\n"]);
        assert_eq!(events, vec![event("message", "d", "")]);
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_but_its_id_counts() {
        let mut parser = SseParser::resuming(String::new());
        assert!(parser.feed(b"event: stdout\nid: 7\n\n").is_empty());
        let events = parser.feed(b"event: x\ndata: after\n\n");
        assert_eq!(events, vec![event("x", "after", "7")]);
    }

    #[test]
    fn the_remembered_id_survives_events_without_an_id() {
        let mut parser = SseParser::resuming("41".to_owned());
        let events = parser.feed(b"event: run\ndata: {}\n\nid: 42\ndata: y\n\n");
        assert_eq!(
            events,
            vec![event("run", "{}", "41"), event("message", "y", "42")]
        );
    }

    #[test]
    fn an_empty_id_resets_and_an_id_with_nul_is_ignored() {
        let events = parse_all(&[b"id: 3\ndata: a\n\nid\ndata: b\n\nid: 4\0\ndata: c\n\n"]);
        assert_eq!(
            events,
            vec![
                event("message", "a", "3"),
                event("message", "b", ""),
                event("message", "c", "")
            ]
        );
    }

    #[test]
    fn a_leading_byte_order_mark_is_removed_once() {
        let events = parse_all(&[b"\xEF\xBB", b"\xBFdata: a\n\n\xEF\xBB\xBFdata: b\n\n"]);
        assert_eq!(events, vec![event("message", "a", "")]);
    }

    #[test]
    fn invalid_utf8_in_a_value_is_replaced() {
        let events = SseParser::resuming(String::new()).feed(b"event: o\xffk\ndata: a\xffb\n\n");
        assert_eq!(events, vec![event("o\u{FFFD}k", "a\u{FFFD}b", "")]);
    }

    #[test]
    fn a_field_name_alone_is_an_empty_value() {
        let events = parse_all(&[b"data\ndata\n\n"]);
        assert_eq!(events, vec![event("message", "\n", "")]);
    }
}
