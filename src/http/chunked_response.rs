//! Writes a streamed response ourselves through `Request::into_writer()`: the status line and
//! headers, then one HTTP chunk per batch (or, for HTTP/1.0 clients, raw bytes and a closed
//! connection), each batch one write + flush so it leaves at once. The answer to a `HEAD`
//! request is the head alone: its body (and chunk framing) is dropped.
#![forbid(unsafe_code)]

use std::io::{self, Write};

use super::reply::HttpStatus;

/// An open streamed response.
pub struct ChunkedResponse {
    socket: Box<dyn Write + Send>,
    chunked: bool,
    head_only: bool,
    /// Bytes not written yet: only for a response started with [`ChunkedResponse::start_held`].
    held: Option<Vec<u8>>,
}

impl ChunkedResponse {
    /// Sends the head. `http10`: the client speaks HTTP/1.0, so the body is delimited by
    /// closing the connection instead of chunked framing.
    pub fn start(
        request: tiny_http::Request,
        status: HttpStatus,
        headers: &[(&str, String)],
    ) -> io::Result<ChunkedResponse> {
        let mut writer = ChunkedResponse::start_held(request, status, headers);
        writer.write_held()?;
        writer.held = None;
        Ok(writer)
    }

    /// Like [`ChunkedResponse::start`], for an answer that is complete when it is written (a
    /// result, not a stream): the head and the batches are held and go out together, in one
    /// write, at [`ChunkedResponse::finish`] (or once they pass a batch's size).
    pub fn start_held(
        request: tiny_http::Request,
        status: HttpStatus,
        headers: &[(&str, String)],
    ) -> ChunkedResponse {
        let http10 = *request.http_version() == tiny_http::HTTPVersion(1, 0);
        let head_only = *request.method() == tiny_http::Method::Head;
        let socket = request.into_writer();
        let mut writer = ChunkedResponse {
            socket,
            chunked: !http10,
            head_only,
            held: Some(Vec::new()),
        };
        let mut head = format!("HTTP/1.1 {} {}\r\n", status.code(), status.reason());
        for (name, value) in headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        if writer.chunked {
            head.push_str("Transfer-Encoding: chunked\r\n");
        } else {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        writer.held = Some(head.into_bytes());
        writer
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
        self.write_held()
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

/// Collects small writes into batches of about `BATCH` bytes, each sent as one chunk: lets
/// serializers that write piecemeal stream through a `ChunkedResponse`.
pub struct Batcher<'a> {
    out: &'a mut ChunkedResponse,
    buf: Vec<u8>,
}

const BATCH: usize = 64 * 1024;

impl<'a> Batcher<'a> {
    pub fn new(out: &'a mut ChunkedResponse) -> Self {
        Batcher {
            out,
            buf: Vec::with_capacity(BATCH),
        }
    }
}

impl Write for Batcher<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= BATCH {
            self.out.send(&self.buf)?;
            self.buf.clear();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.send(&self.buf)?;
        self.buf.clear();
        Ok(())
    }
}
