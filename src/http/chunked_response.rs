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
}

impl ChunkedResponse {
    /// Sends the head. `http10`: the client speaks HTTP/1.0, so the body is delimited by
    /// closing the connection instead of chunked framing.
    pub fn start(
        request: tiny_http::Request,
        status: HttpStatus,
        headers: &[(&str, String)],
    ) -> io::Result<ChunkedResponse> {
        let http10 = *request.http_version() == tiny_http::HTTPVersion(1, 0);
        let head_only = *request.method() == tiny_http::Method::Head;
        let socket = request.into_writer();
        let mut writer = ChunkedResponse {
            socket,
            chunked: !http10,
            head_only,
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
        writer.socket.write_all(head.as_bytes())?;
        writer.socket.flush()?;
        Ok(writer)
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
        if self.chunked {
            let mut framed = Vec::with_capacity(batch.len() + 16);
            framed.extend_from_slice(format!("{:x}\r\n", batch.len()).as_bytes());
            framed.extend_from_slice(batch);
            framed.extend_from_slice(b"\r\n");
            self.socket.write_all(&framed)?;
        } else {
            self.socket.write_all(batch)?;
        }
        self.socket.flush()
    }

    /// Ends the body.
    pub fn finish(mut self) -> io::Result<()> {
        if self.chunked && !self.head_only {
            self.socket.write_all(b"0\r\n\r\n")?;
        }
        self.socket.flush()
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
