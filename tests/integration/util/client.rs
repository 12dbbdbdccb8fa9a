//! A raw HTTP/1.1 client over `TcpStream` for the tests: whole responses, and incremental ones
//! (chunked or length-delimited bodies read piece by piece, with timeouts).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Generous bound for one whole HTTP exchange.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// A whole HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One HTTP/1.1 request with `Connection: close`, read whole.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut resp = open(port, "HTTP/1.1", method, path, headers, body);
    let body = resp.read_all(HTTP_TIMEOUT);
    Response {
        status: resp.status,
        version: resp.version.clone(),
        headers: resp.headers.clone(),
        body,
    }
}

/// Connects and sends a request; a large body is written from another thread so that a server
/// answering early (401, 413) is read while the body is still being sent.
pub fn send_request(
    port: u16,
    version: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut head = format!("{method} {path} {version}\r\nHost: 127.0.0.1:{port}\r\n");
    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    if version == "HTTP/1.1" && !has("Connection") {
        head.push_str("Connection: close\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("Transfer-Encoding") && v.contains("chunked"));
    if !chunked && !has("Content-Length") {
        if let Some(b) = body {
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
        } else if method == "POST" || method == "PATCH" || method == "PUT" {
            head.push_str("Content-Length: 0\r\n");
        }
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        if b.len() <= 64 * 1024 {
            // Errors are left to the response read (a server may close early).
            let _ = stream.write_all(b);
        } else {
            let mut writer = stream.try_clone().unwrap();
            let data = b.to_vec();
            thread::spawn(move || {
                let _ = writer.write_all(&data);
            });
        }
    }
    stream
}

enum Framing {
    Length(usize),
    Chunked(ChunkState),
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ChunkState {
    Size,
    Data(usize),
    DataEnd,
    Trailers,
}

/// What one step of reading an incremental body gives.
#[derive(Debug)]
pub enum BodyRead {
    /// Decoded body bytes and the time their last raw bytes arrived.
    Data(Vec<u8>, Instant),
    /// The body is complete.
    End,
    /// Nothing arrived before the deadline.
    TimedOut,
    /// The connection failed.
    Failed(io::Error),
}

/// A response whose head has been read and whose body is read incrementally.
pub struct StreamingResponse {
    pub status: u16,
    pub version: String,
    pub headers: Vec<(String, String)>,
    /// When the response head was complete.
    pub head_at: Instant,
    stream: TcpStream,
    raw: Vec<u8>,
    raw_at: Instant,
    framing: Framing,
    finished: bool,
    /// Total undecoded bytes received for the body (framing included).
    pub wire_bytes: usize,
}

/// Sends a request and reads the response head (panics after HTTP_TIMEOUT).
pub fn open(
    port: u16,
    version: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> StreamingResponse {
    let stream = send_request(port, version, method, path, headers, body);
    StreamingResponse::read_head(stream, method == "HEAD")
}

impl StreamingResponse {
    pub fn read_head(mut stream: TcpStream, head_request: bool) -> StreamingResponse {
        let deadline = Instant::now() + HTTP_TIMEOUT;
        let mut raw: Vec<u8> = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let head_end = loop {
            if let Some(pos) = find(&raw, b"\r\n\r\n") {
                break pos;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no response head within {HTTP_TIMEOUT:?}");
            stream.set_read_timeout(Some(left)).unwrap();
            match stream.read(&mut buf) {
                Ok(0) => panic!(
                    "connection closed before a complete response head: {:?}",
                    String::from_utf8_lossy(&raw)
                ),
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!(
                    "reading the response head failed: {e}; got {:?}",
                    String::from_utf8_lossy(&raw)
                ),
            }
        };
        let head_at = Instant::now();
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        let rest = raw[head_end + 4..].to_vec();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default().to_string();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_string();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_string(), v.trim().to_string()))
            })
            .collect();
        let chunked = header_of(&headers, "Transfer-Encoding")
            .map(|v| v.to_ascii_lowercase().contains("chunked"))
            .unwrap_or(false);
        let framing = if head_request || status == 204 || status == 304 || status < 200 {
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked(ChunkState::Size)
        } else if let Some(len) = header_of(&headers, "Content-Length") {
            Framing::Length(
                len.parse()
                    .unwrap_or_else(|_| panic!("bad Content-Length {len:?}")),
            )
        } else {
            Framing::Close
        };
        let wire_bytes = rest.len();
        let mut resp = StreamingResponse {
            status,
            version,
            headers,
            head_at,
            stream,
            raw: rest,
            raw_at: head_at,
            framing,
            finished: false,
            wire_bytes,
        };
        if let Framing::Length(0) = resp.framing {
            resp.finished = true;
        }
        resp
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    pub fn is_chunked(&self) -> bool {
        matches!(self.framing, Framing::Chunked(_))
    }

    pub fn is_close_delimited(&self) -> bool {
        matches!(self.framing, Framing::Close)
    }

    /// The underlying socket (e.g. to shut it down).
    pub fn socket(&self) -> &TcpStream {
        &self.stream
    }

    /// Closes both directions of the connection.
    pub fn disconnect(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Reads until some decoded body bytes are available, the body ends, or `deadline`.
    pub fn next_body(&mut self, deadline: Instant) -> BodyRead {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let decoded = self.decode();
            if !decoded.is_empty() {
                return BodyRead::Data(decoded, self.raw_at);
            }
            if self.finished {
                return BodyRead::End;
            }
            let now = Instant::now();
            if now >= deadline {
                return BodyRead::TimedOut;
            }
            let _ = self.stream.set_read_timeout(Some(deadline - now));
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    if let Framing::Close = self.framing {
                        self.finished = true;
                        return BodyRead::End;
                    }
                    return BodyRead::Failed(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a framed body",
                    ));
                }
                Ok(n) => {
                    self.raw_at = Instant::now();
                    self.wire_bytes += n;
                    self.raw.extend_from_slice(&buf[..n]);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return BodyRead::TimedOut;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return BodyRead::Failed(e),
            }
        }
    }

    /// Reads the whole remaining body; panics on timeout or failure.
    pub fn read_all(&mut self, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            match self.next_body(deadline) {
                BodyRead::Data(d, _) => out.extend_from_slice(&d),
                BodyRead::End => return out,
                BodyRead::TimedOut => panic!(
                    "body not complete within {timeout:?} (status {}, {} bytes so far: {:?})",
                    self.status,
                    out.len(),
                    String::from_utf8_lossy(&out[out.len().saturating_sub(500)..])
                ),
                BodyRead::Failed(e) => panic!(
                    "reading the body failed: {e} (status {}, {} bytes so far)",
                    self.status,
                    out.len()
                ),
            }
        }
    }

    fn decode(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            match self.framing {
                Framing::Close => {
                    out.append(&mut self.raw);
                    return out;
                }
                Framing::Length(rem) => {
                    let n = rem.min(self.raw.len());
                    out.extend(self.raw.drain(..n));
                    self.framing = Framing::Length(rem - n);
                    if rem - n == 0 {
                        self.finished = true;
                    }
                    return out;
                }
                Framing::Chunked(state) => match state {
                    ChunkState::Size => {
                        let Some(pos) = find(&self.raw, b"\r\n") else {
                            return out;
                        };
                        let line = String::from_utf8_lossy(&self.raw[..pos]).into_owned();
                        self.raw.drain(..pos + 2);
                        let hex = line.split(';').next().unwrap_or("").trim();
                        let size = usize::from_str_radix(hex, 16)
                            .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
                        self.framing = Framing::Chunked(if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        });
                    }
                    ChunkState::Data(rem) => {
                        let n = rem.min(self.raw.len());
                        out.extend(self.raw.drain(..n));
                        if rem - n == 0 {
                            self.framing = Framing::Chunked(ChunkState::DataEnd);
                        } else {
                            self.framing = Framing::Chunked(ChunkState::Data(rem - n));
                            return out;
                        }
                    }
                    ChunkState::DataEnd => {
                        if self.raw.len() < 2 {
                            return out;
                        }
                        assert_eq!(&self.raw[..2], b"\r\n", "chunk data not followed by CRLF");
                        self.raw.drain(..2);
                        self.framing = Framing::Chunked(ChunkState::Size);
                    }
                    ChunkState::Trailers => {
                        let Some(pos) = find(&self.raw, b"\r\n") else {
                            return out;
                        };
                        self.raw.drain(..pos + 2);
                        if pos == 0 {
                            self.finished = true;
                            self.framing = Framing::Length(0);
                            return out;
                        }
                    }
                },
            }
        }
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The JSON result a sub-runbook call printed on the caller's stdout.
pub fn stdout_json(result: &Value) -> Value {
    let stdout = result["stdout"]
        .as_str()
        .unwrap_or_else(|| panic!("no stdout in {result}"));
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not a JSON result ({e}): {result}"))
}
