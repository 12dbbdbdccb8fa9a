//! Reads a run's Server-Sent Events with the library's parser (`runbookd::client::sse`), handing
//! each event to a handler together with the time of the socket read that completed it.
#![forbid(unsafe_code)]

use std::ops::ControlFlow;
use std::time::{Instant, SystemTime};

use runbookd::client::sse::SseParser;

use crate::client::Connection;
use crate::error::BenchError;

/// One dispatched event.
pub struct Event<'a> {
    pub name: &'a str,
    /// The last event id seen, if any.
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

/// Feeds `bytes` to the parser, handing each event it completes to the handler until it says
/// stop or fails.
fn deliver(
    parser: &mut SseParser,
    bytes: &[u8],
    at: Instant,
    wall: SystemTime,
    on_event: &mut dyn FnMut(&Event<'_>) -> Result<Flow, BenchError>,
) -> Result<Flow, BenchError> {
    let mut outcome = Ok(Flow::Continue);
    let _ = parser.feed_each(bytes, |event| {
        let id = event.last_event_id;
        outcome = on_event(&Event {
            name: event.event_type,
            id: (!id.is_empty()).then_some(id),
            data: event.data.as_bytes(),
            at,
            wall,
        });
        match outcome {
            Ok(Flow::Continue) => ControlFlow::Continue(()),
            Ok(Flow::Stop) | Err(_) => ControlFlow::Break(()),
        }
    });
    outcome
}

/// Reads events from a connection whose head has been read, until the handler stops or the
/// body ends; `deadline` bounds the whole read.
pub fn follow(
    connection: &mut Connection,
    deadline: Instant,
    mut on_event: impl FnMut(&Event<'_>) -> Result<Flow, BenchError>,
) -> Result<Ending, BenchError> {
    let mut parser = SseParser::resuming(String::new());
    let mut bytes = Vec::new();
    loop {
        if Instant::now() > deadline {
            return Err(BenchError::Timeout("event stream still open".into()));
        }
        bytes.clear();
        if !connection.read_body(&mut bytes)? {
            return Ok(Ending::BodyEnd);
        }
        let (at, wall) = connection.last_read();
        if deliver(&mut parser, &bytes, at, wall, &mut on_event)? == Flow::Stop {
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
    let mut parser = SseParser::resuming(String::new());
    deliver(
        &mut parser,
        bytes,
        Instant::now(),
        SystemTime::now(),
        &mut on_event,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_the_last_id_and_stop_ends_delivery() {
        let stream =
            b"event: run\ndata: {}\n\nevent: stdout\nid: 3\ndata: a\ndata: b\r\n\r\ndata:x\r\r";
        let mut seen = Vec::new();
        parse_all(stream, |e| {
            seen.push((
                e.name.to_string(),
                e.id.map(str::to_string),
                e.data.to_vec(),
            ));
            Ok(if e.name == "stdout" {
                Flow::Stop
            } else {
                Flow::Continue
            })
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                ("run".to_string(), None, b"{}".to_vec()),
                (
                    "stdout".to_string(),
                    Some("3".to_string()),
                    b"a\nb".to_vec()
                ),
            ]
        );
    }
}
