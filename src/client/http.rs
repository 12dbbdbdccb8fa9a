//! A small blocking HTTP/1.1 client over `std::net::TcpStream`: writes one request with
//! `Connection: close`, reads the status line and headers, and gives the body as a reader
//! that handles chunked, length-delimited and close-delimited framing.
#![forbid(unsafe_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::chunked::ChunkedDecoder;
use super::lines::read_line;
use super::url::BaseUrl;

/// Longest status or header line accepted.
const MAX_HEAD_LINE: usize = 16 * 1024;
/// Most header lines accepted in one response head.
const MAX_HEADERS: usize = 200;

/// How long connecting, writing and waiting for bytes may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub write: Duration,
    /// Longest silence while reading; a stream with keepalives never reaches it.
    pub read: Duration,
}

/// Why a request got no response head.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The host name did not resolve.
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, #[source] io::Error),
    /// No address of the host accepted the connection.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, #[source] io::Error),
    /// Sending the request failed.
    #[error("cannot send the request: {0}")]
    Write(#[source] io::Error),
    /// Reading the response head failed or timed out.
    #[error("cannot read the response: {0}")]
    Read(#[source] io::Error),
    /// The server closed the connection without answering.
    #[error("the server closed the connection without a reply")]
    NoResponse,
    /// The response head is not HTTP/1.x.
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

/// One request to send.
pub struct Request<'a> {
    pub method: &'a str,
    /// The request target: path and query.
    pub target: String,
    /// Extra headers; `Host`, `Connection` and `Content-Length` are added.
    pub headers: Vec<(&'a str, String)>,
    pub body: Option<&'a [u8]>,
}

/// How the body of a response is delimited.
enum Framing<R> {
    Empty,
    Length { inner: R, remaining: u64 },
    Chunked(ChunkedDecoder<R>),
    UntilClose(R),
}

/// A response: status, headers and a body reader.
pub struct Response<R> {
    pub status: u16,
    /// The protocol of the status line, such as `HTTP/1.1`.
    version: String,
    headers: Vec<(String, String)>,
    body: Framing<R>,
}

impl<R> Response<R> {
    /// The protocol of the status line, such as `HTTP/1.1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Every header, in the order received.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// Whether the body has chunked framing.
    pub fn is_chunked(&self) -> bool {
        matches!(self.body, Framing::Chunked(_))
    }

    /// Whether the body ends where the server closes the connection.
    pub fn is_close_delimited(&self) -> bool {
        matches!(self.body, Framing::UntilClose(_))
    }
}

impl<R: BufRead> Response<R> {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Reads at most `limit` body bytes (the rest is left unread).
    pub fn read_body_limited(&mut self, limit: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.take(limit).read_to_end(&mut out)?;
        Ok(out)
    }
}

impl<R: BufRead> Read for Response<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.body {
            Framing::Empty => Ok(0),
            Framing::Length { inner, remaining } => {
                if *remaining == 0 || buf.is_empty() {
                    return Ok(0);
                }
                let wanted = usize::try_from(*remaining).unwrap_or(usize::MAX);
                let max = buf.len().min(wanted);
                let n = inner.read(&mut buf[..max])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before the end of the body",
                    ));
                }
                *remaining -= n as u64;
                Ok(n)
            }
            Framing::Chunked(decoder) => decoder.read(buf),
            Framing::UntilClose(inner) => inner.read(buf),
        }
    }
}

/// Connects to the base URL's host, sends the request and reads the response head.
pub fn send(
    base: &BaseUrl,
    request: &Request<'_>,
    timeouts: Timeouts,
) -> Result<Response<BufReader<TcpStream>>, HttpError> {
    let stream = connect(base, timeouts)?;
    stream
        .set_write_timeout(Some(timeouts.write))
        .map_err(HttpError::Write)?;
    stream
        .set_read_timeout(Some(timeouts.read))
        .map_err(HttpError::Read)?;
    let mut writer = &stream;
    writer
        .write_all(&encode_request(&base.host_header(), request))
        .and_then(|()| writer.flush())
        .map_err(HttpError::Write)?;
    read_response(BufReader::with_capacity(64 * 1024, stream), request.method)
}

fn connect(base: &BaseUrl, timeouts: Timeouts) -> Result<TcpStream, HttpError> {
    let (host, port) = base.socket_target();
    let addresses = (host, port)
        .to_socket_addrs()
        .map_err(|e| HttpError::Resolve(host.to_owned(), e))?;
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "no address");
    for address in addresses {
        match TcpStream::connect_timeout(&address, timeouts.connect) {
            Ok(stream) => {
                // Small requests and a latency-sensitive stream: no Nagle delay.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last_error = e,
        }
    }
    Err(HttpError::Connect(base.host_header(), last_error))
}

/// The request's bytes: request line, headers, blank line, body; `host` is the `Host` header.
pub fn encode_request(host: &str, request: &Request<'_>) -> Vec<u8> {
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: runbookd/{}\r\nConnection: close\r\n",
        request.method,
        request.target,
        host,
        env!("CARGO_PKG_VERSION")
    );
    for (name, value) in &request.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = request.body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    if let Some(body) = request.body {
        bytes.extend_from_slice(body);
    }
    bytes
}

/// Reads a response head (skipping interim 1xx responses) and sets up the body framing.
pub fn read_response<R: BufRead>(mut reader: R, method: &str) -> Result<Response<R>, HttpError> {
    loop {
        let status_line = match read_line(&mut reader, MAX_HEAD_LINE).map_err(HttpError::Read)? {
            Some(line) => line,
            None => return Err(HttpError::NoResponse),
        };
        let (version, status) = parse_status_line(&status_line)?;
        let headers = read_headers(&mut reader)?;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let body = framing(reader, method, status, &headers)?;
        return Ok(Response {
            status,
            version,
            headers,
            body,
        });
    }
}

fn parse_status_line(line: &[u8]) -> Result<(String, u16), HttpError> {
    let text = std::str::from_utf8(line).map_err(|_| HttpError::Malformed("status line"))?;
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(HttpError::Malformed("status line"));
    }
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::Malformed("status code"));
    }
    let code = code
        .parse()
        .map_err(|_| HttpError::Malformed("status code"))?;
    Ok((version.to_owned(), code))
}

fn read_headers<R: BufRead>(reader: &mut R) -> Result<Vec<(String, String)>, HttpError> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, MAX_HEAD_LINE)
            .map_err(HttpError::Read)?
            .ok_or(HttpError::Read(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside the response head",
            )))?;
        if line.is_empty() {
            return Ok(headers);
        }
        if headers.len() == MAX_HEADERS {
            return Err(HttpError::Malformed("too many headers"));
        }
        let text = String::from_utf8_lossy(&line);
        let (name, value) = text
            .split_once(':')
            .ok_or(HttpError::Malformed("header line"))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
}

/// Every value of the headers with that name (case-insensitive).
fn header_values<'a>(
    headers: &'a [(String, String)],
    name: &'a str,
) -> impl Iterator<Item = &'a str> {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn framing<R: BufRead>(
    reader: R,
    method: &str,
    status: u16,
    headers: &[(String, String)],
) -> Result<Framing<R>, HttpError> {
    if method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    let header = |wanted: &'static str| header_values(headers, wanted);
    if header("transfer-encoding").next().is_some() {
        let last_coding = header("transfer-encoding")
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .last()
            .unwrap_or_default();
        return Ok(if last_coding.eq_ignore_ascii_case("chunked") {
            Framing::Chunked(ChunkedDecoder::new(reader))
        } else {
            Framing::UntilClose(reader)
        });
    }
    let mut length = None;
    for value in header("content-length").flat_map(|v| v.split(',')) {
        let value = value.trim();
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::Malformed("Content-Length"));
        }
        let parsed: u64 = value
            .parse()
            .map_err(|_| HttpError::Malformed("Content-Length"))?;
        if length.is_some_and(|seen| seen != parsed) {
            return Err(HttpError::Malformed("conflicting Content-Length"));
        }
        length = Some(parsed);
    }
    Ok(match length {
        Some(remaining) => Framing::Length {
            inner: reader,
            remaining,
        },
        None => Framing::UntilClose(reader),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(raw: &[u8], method: &str) -> (u16, io::Result<Vec<u8>>) {
        let mut response = read_response(raw, method).unwrap();
        let mut body = Vec::new();
        let result = response.read_to_end(&mut body).map(|_| body);
        (response.status, result)
    }

    #[test]
    fn chunked_body() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let response = read_response(&raw[..], "GET").unwrap();
        assert_eq!(response.header("content-type"), Some("text/event-stream"));
        assert_eq!(body_of(raw, "GET").1.unwrap(), b"abc");
    }

    #[test]
    fn length_body_and_interim_response() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}extra";
        let (status, body) = body_of(raw, "POST");
        assert_eq!(status, 202);
        assert_eq!(body.unwrap(), b"{}");
    }

    #[test]
    fn short_length_body_is_an_error() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
        assert_eq!(
            body_of(raw, "GET").1.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn close_delimited_body_and_http_1_0() {
        let raw = b"HTTP/1.0 200 OK\nContent-Type: text/event-stream\n\ndata: x\n\n";
        assert_eq!(body_of(raw, "GET").1.unwrap(), b"data: x\n\n");
    }

    #[test]
    fn no_body_for_204_and_head() {
        let raw = b"HTTP/1.1 204 No Content\r\n\r\nleftover";
        assert_eq!(body_of(raw, "GET").1.unwrap(), b"");
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(body_of(raw, "HEAD").1.unwrap(), b"");
    }

    #[test]
    fn malformed_heads_are_refused() {
        for raw in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 2x0 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        ] {
            assert!(
                matches!(read_response(raw, "GET"), Err(HttpError::Malformed(_))),
                "{raw:?}"
            );
        }
        assert!(matches!(
            read_response(&b""[..], "GET"),
            Err(HttpError::NoResponse)
        ));
        assert!(matches!(
            read_response(&b"HTTP/1.1 200 OK\r\nA: b\r\n"[..], "GET"),
            Err(HttpError::Read(_))
        ));
    }

    #[test]
    fn request_bytes() {
        let base = BaseUrl::parse("http://[::1]:9/p").unwrap();
        let request = Request {
            method: "POST",
            target: base.target("/api/x?y=1"),
            headers: vec![("Authorization", "Bearer t".to_owned())],
            body: Some(b"{}"),
        };
        let text = String::from_utf8(encode_request(&base.host_header(), &request)).unwrap();
        assert!(text.starts_with("POST /p/api/x?y=1 HTTP/1.1\r\nHost: [::1]:9\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.contains("\r\nAuthorization: Bearer t\r\n"));
        assert!(text.ends_with("\r\nContent-Length: 2\r\n\r\n{}"));
    }
}
