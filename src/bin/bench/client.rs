//! The benchmark's side of one request/response exchange on its own connection, through the
//! library's HTTP client (`runbookd::client::http`), noting the time of every socket read that
//! returned bytes, so a caller can tell when bytes arrived on the wire rather than when it got
//! round to parsing them.
#![forbid(unsafe_code)]

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use runbookd::client::http::{self, HttpError, Request, Response};

use crate::error::BenchError;

/// Size of the receive buffer, and so the most one socket read returns.
const BUFFER_BYTES: usize = 256 * 1024;

/// When the latest socket read that returned bytes did so: monotonic and wall clock.
type Stamp = Arc<Mutex<(Instant, SystemTime)>>;

/// The socket, stamping every read that returns bytes.
struct TimedSocket {
    socket: TcpStream,
    last_read: Stamp,
}

impl Read for TimedSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.socket.read(buf)?;
        if n > 0 {
            let now = (Instant::now(), SystemTime::now());
            *self
                .last_read
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = now;
        }
        Ok(n)
    }
}

/// Where the exchange is.
enum Stage {
    /// The request is being sent.
    Request(TcpStream),
    /// The head has been read; the body is read from here.
    Body(Response<BufReader<TimedSocket>>),
    /// Reading the head failed.
    Broken,
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
    stage: Stage,
    peer: SocketAddr,
    method: String,
    last_read: Stamp,
    scratch: Vec<u8>,
}

/// A failed body or head read: framing errors are the server's, the rest the socket's.
fn read_error(e: io::Error) -> BenchError {
    match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => {
            BenchError::Protocol(e.to_string())
        }
        _ => BenchError::Io("receive".into(), e),
    }
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
            stage: Stage::Request(socket),
            peer: addr,
            method: String::new(),
            last_read: Arc::new(Mutex::new((Instant::now(), SystemTime::now()))),
            scratch: vec![0; BUFFER_BYTES],
        })
    }

    /// Monotonic time of the latest socket read that returned bytes.
    pub fn last_read(&self) -> (Instant, SystemTime) {
        *self
            .last_read
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a request (with `Host`, `Connection: close` and, for a body, `Content-Length`).
    pub fn send(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), BenchError> {
        let Stage::Request(socket) = &mut self.stage else {
            return Err(BenchError::Protocol("request already sent".into()));
        };
        let with_length = !body.is_empty() || method == "POST" || method == "PATCH";
        let request = Request {
            method,
            target: target.to_owned(),
            headers: headers.iter().map(|(n, v)| (*n, (*v).to_owned())).collect(),
            body: with_length.then_some(body),
        };
        self.method = method.to_owned();
        socket
            .write_all(&http::encode_request(&self.peer.to_string(), &request))
            .map_err(BenchError::io("send request"))?;
        socket.flush().map_err(BenchError::io("send request"))
    }

    /// Reads the status line and headers and prepares to decode the body.
    pub fn read_head(&mut self) -> Result<Head, BenchError> {
        let Stage::Request(socket) = std::mem::replace(&mut self.stage, Stage::Broken) else {
            return Err(BenchError::Protocol("head already read".into()));
        };
        let timed = TimedSocket {
            socket,
            last_read: self.last_read.clone(),
        };
        let response =
            http::read_response(BufReader::with_capacity(BUFFER_BYTES, timed), &self.method)
                .map_err(|e| match e {
                    HttpError::Read(e) => read_error(e),
                    other => BenchError::Protocol(other.to_string()),
                })?;
        let head = Head {
            status: response.status,
            headers: response.headers().to_vec(),
        };
        self.stage = Stage::Body(response);
        Ok(head)
    }

    /// Appends the body bytes that are available (reading the socket once if none are) to
    /// `dst`; false once the body is complete.
    pub fn read_body(&mut self, dst: &mut Vec<u8>) -> Result<bool, BenchError> {
        let Stage::Body(response) = &mut self.stage else {
            return Err(BenchError::Protocol("body read before the head".into()));
        };
        loop {
            match response.read(&mut self.scratch) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    dst.extend_from_slice(&self.scratch[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
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
