//! The server address the terminal client talks to: a plain `http://host[:port][/prefix]`
//! base URL, and percent-encoding of path segments built on it.
#![forbid(unsafe_code)]

use std::fmt;

/// The address used when neither `--url` nor `RUNBOOKD_URL` gives one.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8083";

/// Why a base URL was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UrlError {
    /// `https://`: TLS is not spoken here.
    #[error(
        "https is not supported: use a local http address (for TLS, go through a local proxy)"
    )]
    Https,
    /// Not an `http://` URL at all.
    #[error("the URL must start with http://")]
    NotHttp,
    /// No host after the scheme.
    #[error("the URL has no host")]
    MissingHost,
    /// A port that is not a number from 1 to 65535.
    #[error("the URL's port must be a number from 1 to 65535")]
    BadPort,
    /// `user@host`, a query or a fragment, which a base URL cannot carry.
    #[error("the URL must not contain {0}")]
    Unsupported(&'static str),
}

/// A parsed `http://` base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// Host name or address, without brackets for IPv6.
    host: String,
    port: u16,
    /// Path prefix without a trailing slash (empty for the root).
    prefix: String,
}

impl BaseUrl {
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        let text = text.trim();
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(UrlError::Https);
        }
        if !lower.starts_with("http://") {
            return Err(UrlError::NotHttp);
        }
        let rest = &text["http://".len()..];
        if rest.contains('?') {
            return Err(UrlError::Unsupported("a query"));
        }
        if rest.contains('#') {
            return Err(UrlError::Unsupported("a fragment"));
        }
        let (authority, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(UrlError::Unsupported("user information"));
        }
        let (host, port_text) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or(UrlError::MissingHost)?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(after.strip_prefix(':').ok_or(UrlError::BadPort)?),
                ),
            }
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(UrlError::MissingHost);
        }
        let port = match port_text {
            None | Some("") => 80,
            Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => match p.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return Err(UrlError::BadPort),
            },
            Some(_) => return Err(UrlError::BadPort),
        };
        Ok(BaseUrl {
            host: host.to_owned(),
            port,
            prefix: path.trim_end_matches('/').to_owned(),
        })
    }

    /// Host and port to connect to.
    pub fn socket_target(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    /// The `Host` header value.
    pub fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The request target for an absolute API path such as `/api/runs/x`.
    pub fn target(&self, path: &str) -> String {
        format!("{}{}", self.prefix, path)
    }
}

impl fmt::Display for BaseUrl {
    /// The URL as it can be passed to `--url` again.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.host_header(), self.prefix)
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so the text stays one path
/// segment.
pub fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port_and_prefix() {
        let url = BaseUrl::parse("http://127.0.0.1:8083").unwrap();
        assert_eq!(url.socket_target(), ("127.0.0.1", 8083));
        assert_eq!(url.host_header(), "127.0.0.1:8083");
        assert_eq!(url.target("/api/runs"), "/api/runs");

        let url = BaseUrl::parse("HTTP://Example.org/proxy/runbookd/").unwrap();
        assert_eq!(url.socket_target(), ("Example.org", 80));
        assert_eq!(url.target("/api/runs"), "/proxy/runbookd/api/runs");
        assert_eq!(url.to_string(), "http://Example.org:80/proxy/runbookd");

        let url = BaseUrl::parse("http://[::1]:9000/").unwrap();
        assert_eq!(url.socket_target(), ("::1", 9000));
        assert_eq!(url.host_header(), "[::1]:9000");
    }

    #[test]
    fn refuses_what_it_cannot_speak() {
        assert_eq!(BaseUrl::parse("https://h"), Err(UrlError::Https));
        assert!(UrlError::Https
            .to_string()
            .contains("use a local http address"));
        assert_eq!(BaseUrl::parse("ftp://h"), Err(UrlError::NotHttp));
        assert_eq!(BaseUrl::parse("localhost:8083"), Err(UrlError::NotHttp));
        assert_eq!(BaseUrl::parse("http://"), Err(UrlError::MissingHost));
        assert_eq!(BaseUrl::parse("http://:80"), Err(UrlError::MissingHost));
        assert_eq!(BaseUrl::parse("http://h:0"), Err(UrlError::BadPort));
        assert_eq!(BaseUrl::parse("http://h:70000"), Err(UrlError::BadPort));
        assert_eq!(BaseUrl::parse("http://h:+80"), Err(UrlError::BadPort));
        assert_eq!(BaseUrl::parse("http://[::1]x"), Err(UrlError::BadPort));
        assert!(matches!(
            BaseUrl::parse("http://u:p@h"),
            Err(UrlError::Unsupported(_))
        ));
        assert!(matches!(
            BaseUrl::parse("http://h/?a=b"),
            Err(UrlError::Unsupported(_))
        ));
    }

    #[test]
    fn encodes_one_segment() {
        assert_eq!(encode_segment("Hello World.md"), "Hello%20World.md");
        assert_eq!(encode_segment("../a/b?c#d%"), "..%2Fa%2Fb%3Fc%23d%25");
        assert_eq!(encode_segment("é"), "%C3%A9");
        assert_eq!(encode_segment("r1-0a_~"), "r1-0a_~");
    }
}
