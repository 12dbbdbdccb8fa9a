//! Test helper: a scripted HTTP server on 127.0.0.1:0 that answers each accepted connection
//! with the next reply function and records the requests it read.
#![forbid(unsafe_code)]

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::client::http::Timeouts;
use crate::client::lines::read_line;
use crate::client::resume::RetryPolicy;

/// A request as the fake server read it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The request line, e.g. `GET /x HTTP/1.1`.
    pub line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Answers one connection; the connection is closed when it returns.
pub type Reply = Box<dyn FnOnce(&Recorded, &mut TcpStream) + Send>;

/// The head of a chunked event-stream reply.
pub const SSE_HEAD_CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";

/// One chunk of chunked framing around `data`.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// Writes a reply with `status` (and the extra `headers` lines) and the JSON `body`.
pub fn write_json_reply(stream: &mut TcpStream, status: &str, headers: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
}

/// Retry timing short enough for tests.
pub fn quick_policy() -> RetryPolicy {
    RetryPolicy {
        first_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        give_up_after: Duration::from_secs(5),
        healthy_after: Duration::from_secs(5),
        timeouts: Timeouts {
            connect: Duration::from_secs(2),
            write: Duration::from_secs(2),
            read: Duration::from_secs(5),
        },
    }
}

pub struct FakeServer {
    pub url: String,
    handle: JoinHandle<Vec<Recorded>>,
}

impl FakeServer {
    /// Waits for the server thread and returns the requests it answered. A reply function
    /// that failed an assertion fails the test here.
    pub fn finish(self) -> Vec<Recorded> {
        self.handle.join().unwrap()
    }
}

/// Starts a server answering one connection per reply, in order. It stops after the last
/// reply, or when no client connects for 10 seconds.
pub fn serve(replies: Vec<Reply>) -> FakeServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    let handle = thread::spawn(move || {
        let mut recorded = Vec::new();
        for reply in replies {
            let Some(mut stream) = accept_within(&listener, Duration::from_secs(10)) else {
                break;
            };
            let request = read_request(&stream);
            reply(&request, &mut stream);
            recorded.push(request);
        }
        recorded
    });
    FakeServer { url, handle }
}

fn accept_within(listener: &TcpListener, limit: Duration) -> Option<TcpStream> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return Some(stream);
            }
            Err(_) => thread::sleep(Duration::from_millis(2)),
        }
    }
    None
}

fn read_request(stream: &TcpStream) -> Recorded {
    let mut reader = BufReader::new(stream);
    let line = String::from_utf8(read_line(&mut reader, 8192).unwrap().unwrap()).unwrap();
    let mut headers = Vec::new();
    loop {
        let header = String::from_utf8(read_line(&mut reader, 8192).unwrap().unwrap()).unwrap();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap();
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    Recorded {
        line,
        headers,
        body,
    }
}
