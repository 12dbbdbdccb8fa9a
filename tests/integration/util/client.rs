//! The tests' HTTP/1.1 client: raw requests written over `TcpStream` (any version, headers
//! and framing a test needs), responses read with the library's client
//! (`runbookd::client::http`): whole, or incrementally with a deadline per read.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use runbookd::client::http as http_client;
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

/// The deadline of the current read and the time of the last read that returned bytes.
struct WireClock {
    deadline: Instant,
    last_at: Instant,
}

/// The socket as the response reader sees it: every read bounded by the shared deadline.
struct Wire {
    stream: TcpStream,
    clock: Arc<Mutex<WireClock>>,
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let deadline = self
            .clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .deadline;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let n = self.stream.read(buf)?;
        if n > 0 {
            self.clock
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .last_at = Instant::now();
        }
        Ok(n)
    }
}

/// A response whose head has been read and whose body is read incrementally.
pub struct StreamingResponse {
    pub status: u16,
    pub version: String,
    pub headers: Vec<(String, String)>,
    /// When the response head was complete.
    pub head_at: Instant,
    stream: TcpStream,
    body: http_client::Response<BufReader<Wire>>,
    clock: Arc<Mutex<WireClock>>,
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
    pub fn read_head(stream: TcpStream, head_request: bool) -> StreamingResponse {
        let clock = Arc::new(Mutex::new(WireClock {
            deadline: Instant::now() + HTTP_TIMEOUT,
            last_at: Instant::now(),
        }));
        let wire = Wire {
            stream: stream.try_clone().unwrap(),
            clock: clock.clone(),
        };
        let method = if head_request { "HEAD" } else { "GET" };
        let body = http_client::read_response(BufReader::with_capacity(64 * 1024, wire), method)
            .unwrap_or_else(|e| panic!("no complete response head within {HTTP_TIMEOUT:?}: {e}"));
        StreamingResponse {
            status: body.status,
            version: body.version().to_owned(),
            headers: body.headers().to_vec(),
            head_at: Instant::now(),
            stream,
            body,
            clock,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    pub fn is_chunked(&self) -> bool {
        self.body.is_chunked()
    }

    pub fn is_close_delimited(&self) -> bool {
        self.body.is_close_delimited()
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
        self.clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .deadline = deadline;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.body.read(&mut buf) {
                Ok(0) => return BodyRead::End,
                Ok(n) => {
                    let at = self
                        .clock
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .last_at;
                    return BodyRead::Data(buf[..n].to_vec(), at);
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
