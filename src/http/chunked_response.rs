//! Writes a streamed response: the head (from `connection::Response::head`), then one HTTP
//! chunk per batch (or, for HTTP/1.0 clients, raw bytes and a closed connection), each batch
//! one write so it leaves at once. The answer to a `HEAD` request is the head alone: its body
//! (and chunk framing) is dropped. Only a response that was finished lets its connection serve
//! another request.
#![forbid(unsafe_code)]

use std::io::{self, Write};

use super::connection::{AnswerSink, BodyKind, Request};
use super::reply::HttpStatus;

/// An open streamed response.
pub struct ChunkedResponse<'c> {
    socket: Box<dyn AnswerSink + 'c>,
    chunked: bool,
    head_only: bool,
    /// Bytes not written yet: only for a response started with [`ChunkedResponse::start_held`].
    held: Option<Vec<u8>>,
}

impl<'c> ChunkedResponse<'c> {
    /// Sends the head. For an HTTP/1.0 client the body is delimited by closing the connection
    /// instead of chunked framing.
    pub fn start(
        request: Request<'c>,
        status: HttpStatus,
        headers: &[(&str, String)],
    ) -> io::Result<ChunkedResponse<'c>> {
        let mut writer = ChunkedResponse::start_held(request, status, headers);
        writer.write_held()?;
        writer.held = None;
        Ok(writer)
    }

    /// Like [`ChunkedResponse::start`], for an answer that is complete when it is written (a
    /// result, not a stream): the head and the batches are held and go out together, in one
    /// write, at [`ChunkedResponse::finish`] (or once they pass a batch's size).
    pub fn start_held(
        request: Request<'c>,
        status: HttpStatus,
        headers: &[(&str, String)],
    ) -> ChunkedResponse<'c> {
        let mut response = request.into_response();
        let head = response.head(status, headers, BodyKind::Streamed);
        ChunkedResponse {
            chunked: response.chunked(),
            head_only: response.head_only(),
            socket: Box::new(response),
            held: Some(head),
        }
    }

    /// Writes and flushes what is held.
    fn write_held(&mut self) -> io::Result<()> {
        if let Some(held) = &mut self.held {
            self.socket.write_all(held)?;
            held.clear();
        }
        self.socket.flush()
    }

    /// True for a `HEAD` request: the head is all there is to send.
    pub fn head_only(&self) -> bool {
        self.head_only
    }

    /// Sends a [`Batch`] and flushes it: its chunk header goes into the room in front of it,
    /// so body and framing leave in one write without being copied.
    pub fn send_batch(&mut self, batch: &mut Batch) -> io::Result<()> {
        if batch.is_empty() || self.head_only {
            return Ok(());
        }
        if self.held.is_some() || !self.chunked {
            return self.send(batch.bytes());
        }
        let body_len = batch.buf.len() - HEADROOM;
        let header = format!("{body_len:x}\r\n");
        let start = HEADROOM - header.len();
        batch.buf[start..HEADROOM].copy_from_slice(header.as_bytes());
        batch.buf.extend_from_slice(b"\r\n");
        let written = self.socket.write_all(&batch.buf[start..]);
        batch.buf.truncate(HEADROOM + body_len);
        written?;
        self.socket.flush()
    }

    /// Sends one batch and flushes it.
    pub fn send(&mut self, batch: &[u8]) -> io::Result<()> {
        if batch.is_empty() || self.head_only {
            return Ok(());
        }
        if let Some(held) = &mut self.held {
            frame_into(held, batch, self.chunked);
            if held.len() < BATCH {
                return Ok(());
            }
            return self.write_held();
        }
        let mut framed = Vec::with_capacity(batch.len() + 16);
        frame_into(&mut framed, batch, self.chunked);
        self.socket.write_all(&framed)?;
        self.socket.flush()
    }

    /// Ends the body.
    pub fn finish(mut self) -> io::Result<()> {
        let end: &[u8] = if self.chunked && !self.head_only {
            b"0\r\n\r\n"
        } else {
            b""
        };
        match &mut self.held {
            Some(held) => held.extend_from_slice(end),
            None => self.socket.write_all(end)?,
        }
        self.write_held()?;
        self.socket.completed();
        Ok(())
    }
}

/// Appends `batch` to `out` as one HTTP chunk (or as it is, without chunked framing).
fn frame_into(out: &mut Vec<u8>, batch: &[u8], chunked: bool) {
    if chunked {
        out.extend_from_slice(format!("{:x}\r\n", batch.len()).as_bytes());
        out.extend_from_slice(batch);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(batch);
    }
}

/// Room kept in front of a [`Batch`] for its chunk header: the length in hex and CRLF.
const HEADROOM: usize = 2 * std::mem::size_of::<usize>() + 2;

/// Body bytes gathered for one chunk, with room in front for the chunk's header.
pub struct Batch {
    /// `HEADROOM` bytes of room, then the body.
    buf: Vec<u8>,
}

impl Batch {
    pub fn with_capacity(bytes: usize) -> Batch {
        let mut buf = Vec::with_capacity(HEADROOM + bytes + 2);
        buf.resize(HEADROOM, 0);
        Batch { buf }
    }

    /// The batch's bytes, to append the body to: what is there already (the room in front,
    /// and body appended before) must stay as it is.
    pub fn appender(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[HEADROOM..]
    }

    pub fn len(&self) -> usize {
        self.buf.len() - HEADROOM
    }

    pub fn is_empty(&self) -> bool {
        self.buf.len() == HEADROOM
    }

    pub fn clear(&mut self) {
        self.buf.truncate(HEADROOM);
    }
}

/// Collects small writes into batches of about `BATCH` bytes, each sent as one chunk: lets
/// serializers that write piecemeal stream through a `ChunkedResponse`.
pub struct Batcher<'a, 'c> {
    out: &'a mut ChunkedResponse<'c>,
    batch: Batch,
}

const BATCH: usize = 64 * 1024;

impl<'a, 'c> Batcher<'a, 'c> {
    pub fn new(out: &'a mut ChunkedResponse<'c>) -> Self {
        Batcher {
            out,
            batch: Batch::with_capacity(BATCH),
        }
    }
}

impl Write for Batcher<'_, '_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.batch.appender().extend_from_slice(data);
        if self.batch.len() >= BATCH {
            self.out.send_batch(&mut self.batch)?;
            self.batch.clear();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.send_batch(&mut self.batch)?;
        self.batch.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A socket whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Wire(Arc<Mutex<Vec<u8>>>);

    impl Write for Wire {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl AnswerSink for Wire {
        fn completed(&mut self) {}
    }

    fn response(wire: &Wire, chunked: bool) -> ChunkedResponse<'static> {
        ChunkedResponse {
            socket: Box::new(wire.clone()),
            chunked,
            head_only: false,
            held: None,
        }
    }

    #[test]
    fn a_batch_goes_out_framed_and_can_be_filled_again() {
        let wire = Wire::default();
        let mut out = response(&wire, true);
        let mut batch = Batch::with_capacity(16);
        out.send_batch(&mut batch).unwrap();
        batch.appender().extend_from_slice(b"hello");
        out.send_batch(&mut batch).unwrap();
        assert_eq!(batch.bytes(), b"hello");
        batch.clear();
        let big = vec![b'x'; 0x12345];
        batch.appender().extend_from_slice(&big);
        out.send_batch(&mut batch).unwrap();
        out.finish().unwrap();
        let mut expected = b"5\r\nhello\r\n12345\r\n".to_vec();
        expected.extend_from_slice(&big);
        expected.extend_from_slice(b"\r\n0\r\n\r\n");
        assert!(*wire.0.lock().unwrap() == expected);
    }

    #[test]
    fn without_chunked_framing_a_batch_goes_out_as_it_is() {
        let wire = Wire::default();
        let mut out = response(&wire, false);
        let mut batch = Batch::with_capacity(16);
        batch.appender().extend_from_slice(b"data: x\n\n");
        out.send_batch(&mut batch).unwrap();
        out.finish().unwrap();
        assert_eq!(*wire.0.lock().unwrap(), b"data: x\n\n");
    }

    #[test]
    fn the_batcher_sends_full_batches_and_the_rest_on_flush() {
        let wire = Wire::default();
        let mut out = response(&wire, true);
        let mut body = Batcher::new(&mut out);
        body.write_all(&vec![b'a'; BATCH]).unwrap();
        body.write_all(b"rest").unwrap();
        body.flush().unwrap();
        let sent = wire.0.lock().unwrap().clone();
        let head = format!("{BATCH:x}\r\n");
        assert!(sent.starts_with(head.as_bytes()));
        assert!(sent.ends_with(b"\r\n4\r\nrest\r\n"));
        assert_eq!(sent.len(), head.len() + BATCH + 2 + b"4\r\nrest\r\n".len());
    }
}
