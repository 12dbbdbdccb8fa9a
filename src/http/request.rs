//! What a handler needs to know about a request, taken once from its head: method, path, query
//! pairs, headers, client address; and the body, read with the 1 MiB limit.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use super::connection::Request;
use super::error::ApiError;
use super::head::RequestHead;

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
    /// What the handlers read of a request head (its fields are moved, not copied).
    pub fn from_head(head: RequestHead, remote: Option<SocketAddr>) -> Incoming {
        let RequestHead {
            method,
            mut target,
            headers,
            ..
        } = head;
        let query = match target.split_once('?') {
            Some((_, query)) => parse_query(query),
            None => Vec::new(),
        };
        if let Some(at) = target.find('?') {
            target.truncate(at);
        }
        Incoming {
            method,
            path: target,
            query,
            headers,
            remote,
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

/// Reads the body, refusing more than `MAX_BODY_BYTES` (by Content-Length or by counting). The
/// body is read to exactly its Content-Length, or to its last chunk, and never further.
pub fn read_body(request: &mut Request<'_>) -> Result<Vec<u8>, ApiError> {
    Ok(request.read_body(MAX_BODY_BYTES)?)
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
