//! A minimal HTTP/1.1 client over a plain `TcpStream`: sends one request with
//! `Connection: close`, reads the head, and decodes the body (chunked, `Content-Length`, or up
//! to the close). It notes the time of every socket read, so a caller can tell when bytes
//! arrived on the wire rather than when it got round to parsing them.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use crate::error::BenchError;

/// Size of the receive buffer, and so the most one socket read returns.
const BUFFER_BYTES: usize = 256 * 1024;
/// Longest status, header or chunk-size line accepted.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Chunked: reading a size line.
    ChunkSize,
    /// Chunked: this many data bytes of the current chunk are left.
    ChunkData(u64),
    /// Chunked: the CRLF after a chunk's data.
    ChunkEnd,
    /// `Content-Length`: this many bytes are left.
    Length(u64),
    /// No length: the body ends when the server closes.
    UntilClose,
    /// The body is complete.
    Done,
}

/// The status line and headers of a response.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request/response exchange on its own connection.
pub struct Connection {
    socket: TcpStream,
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    framing: Framing,
    eof: bool,
    /// Monotonic time of the latest socket read that returned bytes.
    pub last_read: Instant,
    /// Wall-clock time of that same read.
    pub last_read_wall: SystemTime,
}

impl Connection {
    /// Connects to `addr`; reads that see nothing for `idle` fail.
    pub fn open(addr: SocketAddr, idle: Duration) -> Result<Connection, BenchError> {
        let socket = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(BenchError::io(format!("connect to {addr}")))?;
        socket
            .set_read_timeout(Some(idle))
            .map_err(BenchError::io("set read timeout"))?;
        socket
            .set_write_timeout(Some(idle))
            .map_err(BenchError::io("set write timeout"))?;
        socket
            .set_nodelay(true)
            .map_err(BenchError::io("set TCP_NODELAY"))?;
        Ok(Connection {
            socket,
            buffer: vec![0; BUFFER_BYTES],
            start: 0,
            end: 0,
            framing: Framing::UntilClose,
            eof: false,
            last_read: Instant::now(),
            last_read_wall: SystemTime::now(),
        })
    }

    /// Sends a request (with `Host`, `Connection: close` and, for a body, `Content-Length`).
    pub fn send(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), BenchError> {
        let host = self
            .socket
            .peer_addr()
            .map_err(BenchError::io("peer address"))?;
        let mut request = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() || method == "POST" || method == "PATCH" {
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        request.push_str("Connection: close\r\n\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body);
        self.socket
            .write_all(&bytes)
            .map_err(BenchError::io("send request"))?;
        self.socket.flush().map_err(BenchError::io("send request"))
    }

    /// Reads more bytes into the buffer; false at end of stream.
    fn fill(&mut self) -> Result<bool, BenchError> {
        if self.eof {
            return Ok(false);
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buffer.len() {
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buffer.len() {
            return Err(BenchError::Protocol("receive buffer full".into()));
        }
        loop {
            match self.socket.read(&mut self.buffer[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.last_read = Instant::now();
                    self.last_read_wall = SystemTime::now();
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(BenchError::Io("receive".into(), e)),
            }
        }
    }

    /// One CRLF- (or LF-) terminated line without its terminator.
    fn read_line(&mut self) -> Result<String, BenchError> {
        loop {
            if let Some(at) = self.buffer[self.start..self.end]
                .iter()
                .position(|&b| b == b'\n')
            {
                let raw = &self.buffer[self.start..self.start + at];
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                let line = String::from_utf8_lossy(raw).into_owned();
                self.start += at + 1;
                return Ok(line);
            }
            if self.end - self.start > MAX_LINE_BYTES {
                return Err(BenchError::Protocol("line too long".into()));
            }
            if !self.fill()? {
                return Err(BenchError::Protocol(
                    "connection closed in the middle of a line".into(),
                ));
            }
        }
    }

    /// Reads the status line and headers and prepares to decode the body.
    pub fn read_head(&mut self) -> Result<Head, BenchError> {
        let status_line = self.read_line()?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            return Err(BenchError::Protocol(format!(
                "not an HTTP/1 status line: {status_line:?}"
            )));
        }
        let status = parts
            .next()
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| BenchError::Protocol(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| BenchError::Protocol(format!("bad header line {line:?}")))?;
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
        let head = Head { status, headers };
        let chunked = head
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        self.framing = if chunked {
            Framing::ChunkSize
        } else if let Some(length) = head.header("content-length") {
            let length = length
                .parse::<u64>()
                .map_err(|_| BenchError::Protocol(format!("bad Content-Length {length:?}")))?;
            if length == 0 {
                Framing::Done
            } else {
                Framing::Length(length)
            }
        } else if status == 204 || status == 304 {
            Framing::Done
        } else {
            Framing::UntilClose
        };
        Ok(head)
    }

    /// Appends the body bytes that are available (reading the socket once if none are) to
    /// `dst`; false once the body is complete.
    pub fn read_body(&mut self, dst: &mut Vec<u8>) -> Result<bool, BenchError> {
        loop {
            match self.framing {
                Framing::Done => return Ok(false),
                Framing::ChunkSize => {
                    let line = self.read_line()?;
                    let size = line.split(';').next().unwrap_or_default().trim();
                    let size = u64::from_str_radix(size, 16)
                        .map_err(|_| BenchError::Protocol(format!("bad chunk size {line:?}")))?;
                    if size == 0 {
                        // Trailers, up to the empty line.
                        while !self.read_line()?.is_empty() {}
                        self.framing = Framing::Done;
                    } else {
                        self.framing = Framing::ChunkData(size);
                    }
                }
                Framing::ChunkEnd => {
                    let line = self.read_line()?;
                    if !line.is_empty() {
                        return Err(BenchError::Protocol("chunk not followed by CRLF".into()));
                    }
                    self.framing = Framing::ChunkSize;
                }
                Framing::ChunkData(left) | Framing::Length(left) => {
                    if self.start == self.end && !self.fill()? {
                        return Err(BenchError::Protocol(
                            "connection closed before the end of the body".into(),
                        ));
                    }
                    let available = (self.end - self.start) as u64;
                    let take = available.min(left) as usize;
                    dst.extend_from_slice(&self.buffer[self.start..self.start + take]);
                    self.start += take;
                    let left = left - take as u64;
                    self.framing = match self.framing {
                        Framing::ChunkData(_) if left == 0 => Framing::ChunkEnd,
                        Framing::ChunkData(_) => Framing::ChunkData(left),
                        _ if left == 0 => Framing::Done,
                        _ => Framing::Length(left),
                    };
                    return Ok(true);
                }
                Framing::UntilClose => {
                    if self.start == self.end && !self.fill()? {
                        self.framing = Framing::Done;
                        return Ok(false);
                    }
                    dst.extend_from_slice(&self.buffer[self.start..self.end]);
                    self.start = self.end;
                    return Ok(true);
                }
            }
        }
    }

    /// The whole body, refusing more than `limit` bytes.
    pub fn read_body_to_end(&mut self, limit: usize) -> Result<Vec<u8>, BenchError> {
        let mut body = Vec::new();
        while self.read_body(&mut body)? {
            if body.len() > limit {
                return Err(BenchError::Protocol(format!(
                    "body larger than {limit} bytes"
                )));
            }
        }
        Ok(body)
    }
}
