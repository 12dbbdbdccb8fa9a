//! What a handler needs to know about a request, read once from tiny_http: method, decoded path
//! parts, query pairs, headers, client address, and the body (read with the 1 MiB limit).
#![forbid(unsafe_code)]

use std::io::Read;
use std::net::SocketAddr;

use super::error::ApiError;
use crate::client::chunked::ChunkedDecoder;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: u64 = 1024 * 1024;

pub struct Incoming {
    pub method: String,
    /// The path without the query string, still percent-encoded.
    pub path: String,
    pub query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    pub remote: Option<SocketAddr>,
}

impl Incoming {
    pub fn from_request(request: &tiny_http::Request) -> Incoming {
        let url = request.url();
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        Incoming {
            method: request.method().as_str().to_ascii_uppercase(),
            path: path.to_string(),
            query: parse_query(query),
            headers: request
                .headers()
                .iter()
                .map(|h| {
                    (
                        h.field.as_str().as_str().to_ascii_lowercase(),
                        h.value.as_str().to_string(),
                    )
                })
                .collect(),
            remote: request.remote_addr().copied(),
        }
    }

    /// First value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// First value of a query parameter.
    pub fn query_value(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a query flag is set to a true value.
    pub fn query_flag(&self, name: &str) -> bool {
        matches!(self.query_value(name), Some("true" | "1" | "yes"))
    }

    /// The client's address: the peer's, or, when the peer is a trusted proxy, the address
    /// it forwards in `X-Real-IP` (else the last `X-Forwarded-For` entry).
    pub fn client_ip(&self, trusted_proxies: &[std::net::IpAddr]) -> String {
        let peer = self.remote.map(|a| a.ip());
        if peer.is_some_and(|p| trusted_proxies.contains(&p)) {
            let forwarded = self
                .header("x-real-ip")
                .or_else(|| {
                    self.header("x-forwarded-for")
                        .and_then(|f| f.rsplit(',').next())
                })
                .map(str::trim)
                .and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
            if let Some(ip) = forwarded {
                return ip.to_string();
            }
        }
        peer.map(|p| p.to_string()).unwrap_or_default()
    }
}

/// How the request delimits its body, decided from its headers as tiny_http does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `Transfer-Encoding` (always chunked, as tiny_http reads it).
    Chunked,
    Length(u64),
    /// Neither header: no body.
    Empty,
}

/// Whether tiny_http took the request for a protocol upgrade (`Connection` containing
/// "upgrade"). It then hands over the raw socket as the body reader, ignoring the body's
/// framing, so the framing has to be applied here.
fn is_upgrade(request: &tiny_http::Request) -> bool {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Connection"))
        .is_some_and(|h| h.value.as_str().to_ascii_lowercase().contains("upgrade"))
}

fn framing(request: &tiny_http::Request) -> Framing {
    if request
        .headers()
        .iter()
        .any(|h| h.field.equiv("Transfer-Encoding"))
    {
        Framing::Chunked
    } else if let Some(len) = request.body_length() {
        Framing::Length(len as u64)
    } else {
        Framing::Empty
    }
}

fn unreadable(e: &std::io::Error) -> ApiError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ApiError::RequestTimeout,
        _ => ApiError::BadRequest("the request body could not be read".into()),
    }
}

/// Reads the body, refusing more than `MAX_BODY_BYTES` (by Content-Length or by counting). The
/// body is read to exactly its Content-Length, or to its last chunk, and never further, whatever
/// `Connection` and `Upgrade` say: after an "upgrade" request the reader is the raw socket, and
/// reading it to its end would wait for the client (or proxy) to close the connection.
pub fn read_body(request: &mut tiny_http::Request) -> Result<Vec<u8>, ApiError> {
    let framing = framing(request);
    if let Framing::Length(len) = framing {
        if len > MAX_BODY_BYTES {
            return Err(ApiError::PayloadTooLarge);
        }
    }
    let upgrade = is_upgrade(request);
    let reader = request.as_reader();
    let mut body = Vec::new();
    match framing {
        Framing::Empty => return Ok(body),
        Framing::Length(len) => {
            reader
                .take(len)
                .read_to_end(&mut body)
                .map_err(|e| unreadable(&e))?;
            if (body.len() as u64) < len {
                return Err(ApiError::BadRequest(
                    "the request body ended before its Content-Length".into(),
                ));
            }
        }
        Framing::Chunked if upgrade => {
            ChunkedDecoder::new(std::io::BufReader::new(reader))
                .take(MAX_BODY_BYTES + 1)
                .read_to_end(&mut body)
                .map_err(|e| unreadable(&e))?;
        }
        Framing::Chunked => {
            reader
                .take(MAX_BODY_BYTES + 1)
                .read_to_end(&mut body)
                .map_err(|e| unreadable(&e))?;
        }
    }
    if body.len() as u64 > MAX_BODY_BYTES {
        return Err(ApiError::PayloadTooLarge);
    }
    Ok(body)
}

/// Parses a JSON object body; an empty body is an empty object.
pub fn json_body(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::BadRequest(format!("invalid JSON body: {e}"))),
    }
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (
                percent_decode(&k.replace('+', " ")).unwrap_or_default(),
                percent_decode(&v.replace('+', " ")).unwrap_or_default(),
            )
        })
        .collect()
}

/// Decodes `%XX` escapes; None when an escape is malformed or the result is not UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(percent_decode("%2e%2e").as_deref(), Some(".."));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%00").as_deref(), Some("\0"));
    }

    #[test]
    fn query_pairs() {
        let q = parse_query("stream=true&x=a+b&empty");
        assert_eq!(q[0], ("stream".into(), "true".into()));
        assert_eq!(q[1], ("x".into(), "a b".into()));
        assert_eq!(q[2], ("empty".into(), "".into()));
    }

    #[test]
    fn empty_body_is_empty_object() {
        assert!(json_body(b"").unwrap().is_empty());
        assert!(json_body(b"[1]").is_err());
        assert!(json_body(b"{bad").is_err());
    }
}
