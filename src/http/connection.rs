//! One client connection, read by the thread that serves it: each request head within its size
//! and time bounds (`head.rs` parses it), the body through its framing (with `100 Continue`
//! when the client waits for it), and after each answer the choice to read the next request or
//! to close. An answer is a [`Response`]: the head it gets (framing, `Connection: close`) is
//! decided here, what goes into it by `reply.rs` and `chunked_response.rs`.
//!
//! The connection's socket carries the timeouts set on the listening socket (`http::bind`): a
//! read waits at most `REQUEST_TIMEOUT_SECONDS` for a byte, a write at most
//! `VIEWER_STALL_SECONDS`.
#![forbid(unsafe_code)]

use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::head::{self, BodyFraming, HeadError, RequestHead, Version};
use super::reply::HttpStatus;
use crate::client::chunked::ChunkedDecoder;

/// Bytes asked of the socket per read.
const READ_SIZE: usize = 4 * 1024;

/// A body nobody read, up to this size, is read and dropped before the answer, so that the
/// connection can serve the next request; a larger one (or a chunked one) closes it.
const DRAIN_MAX: u64 = 64 * 1024;

/// Closing a socket with request bytes unread resets the connection, which can destroy the
/// answer before the client reads it. So after an answer that left a body unread, runbookd
/// stops sending and reads (and drops) up to this much for up to `LINGER` before it closes.
const LINGER_MAX: usize = 1024 * 1024;
const LINGER: Duration = Duration::from_secs(2);

/// The bytes read from the socket and not yet used.
struct Input {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
}

impl Input {
    fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Reads more bytes after the buffered ones; `Ok(0)` at the end of the stream.
    fn read_more(&mut self) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + READ_SIZE, 0);
        let read = (&self.stream).read(&mut self.buf[len..]);
        self.buf.truncate(len + read.as_ref().map_or(0, |n| *n));
        read
    }

    /// Frees the buffer when nothing is in it: a stream may hold its connection for hours.
    fn release_if_empty(&mut self) {
        if self.pos == self.buf.len() {
            self.buf = Vec::new();
            self.pos = 0;
        }
    }
}

impl Read for Input {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() && out.len() >= READ_SIZE {
            return (&self.stream).read(out);
        }
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Input {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.buf.len() {
            self.read_more()?;
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }
}

/// A client connection.
pub struct Connection {
    input: Input,
    remote: Option<SocketAddr>,
    /// The longest a request head may take to arrive once its first byte has.
    head_timeout: Duration,
    /// Set by a complete answer that keeps the connection open.
    reusable: bool,
    /// Request bytes may be left unread: closing must linger.
    unread: bool,
}

impl Connection {
    pub fn new(stream: TcpStream, remote: Option<SocketAddr>, head_timeout: Duration) -> Self {
        Connection {
            input: Input {
                stream,
                buf: Vec::new(),
                pos: 0,
            },
            remote,
            head_timeout,
            reusable: true,
            unread: false,
        }
    }

    /// Whether the last answer left the connection able to serve another request.
    pub fn reusable(&self) -> bool {
        self.reusable
    }

    /// Reads the next request head. `Ok(None)`: the connection ended, failed, or stayed idle
    /// for the request timeout before a request began, or the last answer closed it; nothing is
    /// to be answered. An error is to be answered with [`Connection::refusal`].
    pub fn next_request(&mut self) -> Result<Option<(RequestHead, Request<'_>)>, HeadError> {
        if !self.reusable {
            return Ok(None);
        }
        self.reusable = false;
        let head = match self.read_head() {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(None),
            Err(e) => {
                // The rest of the head, or a body, may still come: closing must linger.
                self.unread = true;
                return Err(e);
            }
        };
        let body_done = head.framing == BodyFraming::Empty;
        let request = Request {
            version: head.version,
            head_only: head.method == "HEAD",
            framing: head.framing,
            keep_alive: head.keep_alive,
            expects_continue: head.expects_continue,
            body_done,
            conn: self,
        };
        Ok(Some((head, request)))
    }

    fn read_head(&mut self) -> Result<Option<RequestHead>, HeadError> {
        let mut began = (!self.input.buffered().is_empty()).then(Instant::now);
        let mut searched = 0;
        loop {
            let skip = head::leading_empty_lines(self.input.buffered());
            if skip > 0 {
                self.input.consume(skip);
                searched = 0;
            }
            let buffered = self.input.buffered();
            if let Some(end) = head::head_end(buffered, searched) {
                let parsed = head::parse(&buffered[..end]);
                self.input.consume(end);
                return parsed.map(Some);
            }
            if buffered.len() > head::MAX_HEAD_BYTES {
                return Err(HeadError::TooLarge);
            }
            let idle = buffered.is_empty();
            searched = buffered.len();
            match self.input.read_more() {
                Ok(0) => return Ok(None),
                Ok(_) => {
                    let began = *began.get_or_insert_with(Instant::now);
                    if began.elapsed() > self.head_timeout {
                        return Err(HeadError::TimedOut);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) && !idle => return Err(HeadError::TimedOut),
                Err(_) => return Ok(None),
            }
        }
    }

    /// The answer to a head that could not be read (or was not read): the connection closes
    /// after it.
    pub fn refusal(&mut self) -> Response<'_> {
        Response {
            conn: self,
            close: true,
            http10: false,
            head_only: false,
            chunked: false,
        }
    }

    /// Ends the connection. When request bytes may be left unread, stops sending first and
    /// reads (and drops) what still comes for a while, so that the client gets the answer
    /// instead of a reset.
    pub fn close(self) {
        if !self.unread {
            return;
        }
        let stream = &self.input.stream;
        if stream.shutdown(Shutdown::Write).is_err() {
            return;
        }
        let _ = stream.set_read_timeout(Some(Duration::from_millis(250)));
        let deadline = Instant::now() + LINGER;
        let mut dropped = 0;
        let mut scratch = [0u8; READ_SIZE];
        while dropped < LINGER_MAX && Instant::now() < deadline {
            match (&self.input.stream).read(&mut scratch) {
                Ok(0) => return,
                Ok(n) => dropped += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {}
                Err(_) => return,
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body is larger than {0} bytes")]
    TooLarge(u64),
    #[error("no byte of the request body arrived within the request timeout")]
    TimedOut,
    #[error("the request body ended before its Content-Length or last chunk")]
    Truncated,
    #[error("the request body could not be read")]
    Unreadable(#[source] io::Error),
}

impl From<io::Error> for BodyError {
    fn from(e: io::Error) -> Self {
        if is_timeout(&e) {
            BodyError::TimedOut
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            BodyError::Truncated
        } else {
            BodyError::Unreadable(e)
        }
    }
}

/// A request being served: its body, still on the connection, and the way to answer it.
pub struct Request<'c> {
    conn: &'c mut Connection,
    version: Version,
    head_only: bool,
    framing: BodyFraming,
    keep_alive: bool,
    expects_continue: bool,
    /// The body has been read to its end (or there is none).
    body_done: bool,
}

impl<'c> Request<'c> {
    pub fn remote(&self) -> Option<SocketAddr> {
        self.conn.remote
    }

    /// Reads the whole body, refusing one of more than `limit` bytes (by its Content-Length, or
    /// by counting a chunked one). Never reads past the body's end. A second call returns
    /// nothing.
    pub fn read_body(&mut self, limit: u64) -> Result<Vec<u8>, BodyError> {
        let mut body = Vec::new();
        if self.body_done {
            return Ok(body);
        }
        if let BodyFraming::Length(len) = self.framing {
            if len > limit {
                return Err(BodyError::TooLarge(limit));
            }
        }
        if self.expects_continue {
            self.expects_continue = false;
            (&self.conn.input.stream)
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(BodyError::Unreadable)?;
        }
        match self.framing {
            BodyFraming::Empty => {}
            BodyFraming::Length(len) => {
                body.reserve(usize::try_from(len).unwrap_or(0));
                (&mut self.conn.input).take(len).read_to_end(&mut body)?;
                if (body.len() as u64) < len {
                    return Err(BodyError::Truncated);
                }
            }
            BodyFraming::Chunked => {
                // The framing is bounded too: chunk extensions and trailers carry no body.
                let mut wire = (&mut self.conn.input).take(chunked_wire_limit(limit));
                let read = ChunkedDecoder::new(&mut wire)
                    .take(limit.saturating_add(1))
                    .read_to_end(&mut body);
                if wire.limit() == 0 || body.len() as u64 > limit {
                    return Err(BodyError::TooLarge(limit));
                }
                read?;
            }
        }
        self.body_done = true;
        Ok(body)
    }

    /// Starts the answer. A body nobody read is read and dropped first when it is small, so
    /// the connection can serve the next request; otherwise the answer closes the connection.
    pub fn into_response(self) -> Response<'c> {
        let mut close = !self.keep_alive;
        if !self.body_done {
            let drained = match self.framing {
                BodyFraming::Length(len) if len <= DRAIN_MAX && !self.expects_continue => {
                    io::copy(&mut (&mut self.conn.input).take(len), &mut io::sink())
                        .is_ok_and(|n| n == len)
                }
                _ => false,
            };
            if !drained {
                self.conn.unread = true;
                close = true;
            }
        }
        self.conn.input.release_if_empty();
        Response {
            conn: self.conn,
            close,
            http10: self.version == Version::Http10,
            head_only: self.head_only,
            chunked: false,
        }
    }
}

/// The most bytes a chunked body of at most `limit` bytes may take on the wire, framing
/// included: one-byte chunks take six bytes each, and some room is left for extensions.
fn chunked_wire_limit(limit: u64) -> u64 {
    limit.saturating_mul(8).saturating_add(64 * 1024)
}

/// How the body of an answer is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// This many bytes (`Content-Length`).
    Sized(usize),
    /// Not known in advance: chunked, or for an HTTP/1.0 client, up to the connection's close.
    Streamed,
    /// No body at all (204).
    None,
}

/// An answer being written.
pub struct Response<'c> {
    conn: &'c mut Connection,
    close: bool,
    http10: bool,
    head_only: bool,
    chunked: bool,
}

/// What a response's writer needs beyond `Write`: to say that the answer is complete.
pub trait AnswerSink: Write {
    /// The answer has been written in full: the connection may serve another request.
    fn completed(&mut self);
}

impl Response<'_> {
    /// True for an answer to `HEAD`: the head is all there is to send.
    pub fn head_only(&self) -> bool {
        self.head_only
    }

    /// Whether the body goes in chunked framing (decided by [`Response::head`]).
    pub fn chunked(&self) -> bool {
        self.chunked
    }

    /// The answer's head: status line, date, the given fields (any whose value holds a line
    /// break left out), then the framing and, when the connection ends after this answer,
    /// `Connection: close`.
    pub fn head(
        &mut self,
        status: HttpStatus,
        fields: &[(&str, String)],
        body: BodyKind,
    ) -> Vec<u8> {
        let mut head = Vec::with_capacity(256);
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(status.code().to_string().as_bytes());
        head.push(b' ');
        head.extend_from_slice(status.reason().as_bytes());
        head.extend_from_slice(b"\r\nDate: ");
        head.extend_from_slice(http_date(chrono::Utc::now()).as_bytes());
        head.extend_from_slice(b"\r\n");
        for (name, value) in fields {
            // A value that could end the field (or the head) is left out, never sent.
            if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                log::warn!("header {name} left out of an answer: its value has a line break");
                continue;
            }
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        match body {
            BodyKind::Sized(len) => {
                head.extend_from_slice(format!("Content-Length: {len}\r\n").as_bytes())
            }
            BodyKind::Streamed if self.http10 => self.close = true,
            BodyKind::Streamed => {
                self.chunked = true;
                head.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            }
            BodyKind::None => {}
        }
        if self.close {
            head.extend_from_slice(b"Connection: close\r\n");
        } else if self.http10 {
            // An HTTP/1.0 client keeps the connection only when told so.
            head.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        head.extend_from_slice(b"\r\n");
        head
    }
}

impl Write for Response<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        (&self.conn.input.stream).write(data)
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        (&self.conn.input.stream).write_all(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AnswerSink for Response<'_> {
    fn completed(&mut self) {
        self.conn.reusable = !self.close;
    }
}

/// An HTTP date (RFC 9110 § 5.6.7): `Sat, 05 Dec 2026 02:02:05 GMT`.
fn http_date(now: chrono::DateTime<chrono::Utc>) -> String {
    now.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A connection served by this test's thread, and the client's end of it.
    fn pair() -> (Connection, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        (
            Connection::new(server, Some(peer), Duration::from_secs(5)),
            client,
        )
    }

    /// Answers through `reply.rs`, as the server does: a 404 whose error text is `text`.
    fn answer(request: Request<'_>, text: &str) {
        let error = crate::http::error::ApiError::NotFound(text.into());
        crate::http::reply::send_error(request.into_response(), &error);
    }

    /// The status line every test answer has.
    const ANSWERED: &str = "HTTP/1.1 404 Not Found\r\n";

    fn received(client: &mut TcpStream) -> String {
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = client.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn pipelined_requests_are_served_in_order_with_their_bodies() {
        let (mut conn, mut client) = pair();
        client
            .write_all(
                b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nonePOST /b HTTP/1.1\r\n\
                  Transfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\nGET /c HTTP/1.1\r\n\r\n",
            )
            .unwrap();
        let mut seen = Vec::new();
        while let Some((head, mut request)) = conn.next_request().unwrap() {
            let body = request.read_body(100).unwrap();
            seen.push((head.target, String::from_utf8(body).unwrap()));
            answer(request, "ok");
            if seen.len() == 3 {
                break;
            }
        }
        assert_eq!(
            seen,
            vec![
                ("/a".to_string(), "one".to_string()),
                ("/b".to_string(), "two".to_string()),
                ("/c".to_string(), String::new())
            ]
        );
        let text = received(&mut client);
        assert_eq!(text.matches(ANSWERED).count(), 3, "{text}");
        assert!(!text.contains("Connection: close"), "{text}");
    }

    /// Sends `raw` (two requests), answers both as "one" and "two"; the second target, whether
    /// the connection could go on after each answer, and what the client received.
    fn two_requests(raw: &[u8]) -> (String, [bool; 2], String) {
        let (mut conn, mut client) = pair();
        client.write_all(raw).unwrap();
        let (_, request) = conn.next_request().unwrap().unwrap();
        answer(request, "one");
        let after_first = conn.reusable();
        let (head, request) = conn.next_request().unwrap().unwrap();
        answer(request, "two");
        let after_second = conn.reusable();
        (
            head.target,
            [after_first, after_second],
            received(&mut client),
        )
    }

    #[test]
    fn an_unread_small_body_is_dropped_and_an_http10_client_is_told_what_happens() {
        // A small body nobody read: dropped, and the connection goes on.
        let small_body =
            b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n\r\n";
        // HTTP/1.0: kept only when asked, and told so.
        let old_client =
            b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n";
        for (raw, expected) in [
            (&small_body[..], [true, true]),
            (&old_client[..], [true, false]),
        ] {
            let (second, reusable, text) = two_requests(raw);
            assert_eq!(second, "/b");
            assert_eq!(reusable, expected, "{text}");
            assert_eq!(text.matches(ANSWERED).count(), 2, "{text}");
            if expected == [true, false] {
                let (first, second) = text.split_once("one").unwrap();
                assert!(first.contains("Connection: keep-alive\r\n"), "{text}");
                assert!(second.contains("Connection: close\r\n"), "{text}");
            }
        }
    }

    #[test]
    fn an_unread_large_body_closes_the_connection_after_the_answer() {
        let (mut conn, mut client) = pair();
        client
            .write_all(b"POST /a HTTP/1.1\r\nContent-Length: 10000000\r\n\r\nsome")
            .unwrap();
        let (_, mut request) = conn.next_request().unwrap().unwrap();
        assert!(matches!(
            request.read_body(1000),
            Err(BodyError::TooLarge(1000))
        ));
        answer(request, "too large");
        assert!(!conn.reusable());
        assert!(conn.next_request().unwrap().is_none());
        conn.close();
        let text = received(&mut client);
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(
            text.ends_with("\"error\":\"too large\",\"success\":false}"),
            "{text}"
        );
    }

    #[test]
    fn chunk_framing_without_end_is_bounded_like_a_body() {
        let (mut conn, mut client) = pair();
        client
            .write_all(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
            .unwrap();
        let writer = std::thread::spawn(move || {
            // Trailer lines without end.
            while client.write_all(b"X-Trailer: and on\r\n").is_ok() {}
        });
        let (_, mut request) = conn.next_request().unwrap().unwrap();
        assert!(matches!(
            request.read_body(100),
            Err(BodyError::TooLarge(100))
        ));
        answer(request, "too large");
        assert!(!conn.reusable());
        drop(conn);
        writer.join().unwrap();
    }

    #[test]
    fn the_client_waiting_for_continue_gets_it_before_the_body_is_read() {
        let (mut conn, mut client) = pair();
        client
            .write_all(b"POST /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            .unwrap();
        let (_, mut request) = conn.next_request().unwrap().unwrap();
        let reader = std::thread::spawn(move || {
            let mut interim = [0u8; 25];
            client.read_exact(&mut interim).unwrap();
            assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
            client.write_all(b"hi").unwrap();
            client
        });
        assert_eq!(request.read_body(10).unwrap(), b"hi");
        answer(request, "ok");
        let mut client = reader.join().unwrap();
        assert!(received(&mut client).starts_with(ANSWERED));
    }

    #[test]
    fn http10_closes_and_a_truncated_body_is_an_error() {
        let (mut conn, mut client) = pair();
        client
            .write_all(b"POST /a HTTP/1.0\r\nContent-Length: 9\r\n\r\nabc")
            .unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let (head, mut request) = conn.next_request().unwrap().unwrap();
        assert_eq!(head.version, Version::Http10);
        assert!(matches!(request.read_body(100), Err(BodyError::Truncated)));
        answer(request, "x");
        assert!(!conn.reusable());
        assert!(received(&mut client).contains("Connection: close\r\n"));
    }

    #[test]
    fn a_head_over_the_limit_is_refused_without_reading_on() {
        let (mut conn, mut client) = pair();
        let big = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(head::MAX_HEAD_BYTES)
        );
        let writer = std::thread::spawn(move || {
            let _ = client.write_all(big.as_bytes());
            client
        });
        assert!(matches!(conn.next_request(), Err(HeadError::TooLarge)));
        drop(writer.join().unwrap());
    }

    #[test]
    fn an_idle_connection_ends_quietly_and_a_stalled_head_times_out() {
        let (mut conn, _client) = pair();
        assert!(conn.next_request().unwrap().is_none());
        let (mut conn, mut client) = pair();
        client.write_all(b"GET / HT").unwrap();
        assert!(matches!(conn.next_request(), Err(HeadError::TimedOut)));
    }

    #[test]
    fn dates_are_in_http_form() {
        let when = chrono::DateTime::parse_from_rfc3339("2026-12-05T02:02:05Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(http_date(when), "Sat, 05 Dec 2026 02:02:05 GMT");
    }
}
