//! Parsing a request head (request line and header fields) and what it decides: how the body is
//! framed, whether the connection may serve another request, whether the client waits for
//! `100 Continue`. Strict wherever leniency would let one request mean two things to runbookd
//! and a proxy in front of it (request smuggling): no whitespace before a field's colon, no
//! folded lines, no `Content-Length` beside `Transfer-Encoding`, no two different lengths,
//! no transfer coding but `chunked`. Bounded: the head's size and its number of fields.
#![forbid(unsafe_code)]

/// Largest request head accepted (request line and fields): more than the shipped nginx accepts
/// from a client (1 KiB + 4 × 16 KiB) with the fields it adds, so nothing nginx passes is refused.
pub const MAX_HEAD_BYTES: usize = 72 * 1024;

/// Most header fields accepted in one head.
pub const MAX_HEADER_FIELDS: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How the request delimits its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// Neither `Content-Length` nor `Transfer-Encoding`: no body.
    Empty,
    Length(u64),
    Chunked,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// As sent, in upper case.
    pub method: String,
    /// The request target as sent (path and query, still percent-encoded).
    pub target: String,
    pub version: Version,
    /// Field names in lower case, values without surrounding whitespace, in the order sent.
    pub headers: Vec<(String, String)>,
    pub framing: BodyFraming,
    /// Whether the client lets the connection serve another request after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1): the client waits for `100 Continue` before the body.
    pub expects_continue: bool,
}

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the request head is larger than {MAX_HEAD_BYTES} bytes or has more than {MAX_HEADER_FIELDS} header fields")]
    TooLarge,
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    #[error("only HTTP/1.0 and HTTP/1.1 are supported")]
    Version,
    #[error("unsupported Transfer-Encoding: only chunked is accepted")]
    TransferEncoding,
    #[error("the request head was not complete within the request timeout")]
    TimedOut,
}

/// Where the head that starts at `buf[0]` ends: the index just past its empty line (CRLF or
/// LF). `searched`: how many bytes earlier calls looked at already, so a head arriving in many
/// pieces is not searched from its start each time.
pub fn head_end(buf: &[u8], searched: usize) -> Option<usize> {
    let from = searched.min(buf.len()).saturating_sub(3);
    let mut at = from;
    while let Some(i) = memchr::memchr(b'\n', &buf[at..]) {
        let lf = at + i;
        match buf.get(lf + 1) {
            Some(b'\n') => return Some(lf + 2),
            Some(b'\r') if buf.get(lf + 2) == Some(&b'\n') => return Some(lf + 3),
            Some(_) => at = lf + 1,
            None => return None,
        }
    }
    None
}

/// How many empty lines (CRLF or LF) precede a request line; a client may send some after a
/// body, and they are ignored.
pub fn leading_empty_lines(buf: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match buf.get(at..) {
            Some([b'\r', b'\n', ..]) => at += 2,
            Some([b'\n', ..]) => at += 1,
            _ => return at,
        }
    }
}

/// A `tchar` of RFC 9110: what a method and a field name are made of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(text: &[u8]) -> bool {
    !text.is_empty() && text.iter().all(|&b| is_token_byte(b))
}

/// The head's lines, without their CRLF or LF; a CR anywhere else is refused.
fn lines(head: &[u8]) -> Result<Vec<&[u8]>, HeadError> {
    let mut out = Vec::new();
    for line in head.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.contains(&b'\r') {
            return Err(HeadError::Malformed("a CR inside a line"));
        }
        out.push(line);
    }
    Ok(out)
}

/// Parses a complete head: `head` runs from the request line to the empty line that ends the
/// head (as [`head_end`] found it), leading empty lines removed.
pub fn parse(head: &[u8]) -> Result<RequestHead, HeadError> {
    if head.len() > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let lines = lines(head)?;
    let mut lines = lines.into_iter().filter(|l| !l.is_empty());
    let request_line = lines
        .next()
        .ok_or(HeadError::Malformed("no request line"))?;
    let (method, target, version) = request_line_parts(request_line)?;
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() == MAX_HEADER_FIELDS {
            return Err(HeadError::TooLarge);
        }
        headers.push(field(line)?);
    }
    let framing = framing(&headers, version)?;
    let connection_has = |token: &str| {
        headers
            .iter()
            .filter(|(n, _)| n == "connection")
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let keep_alive = match version {
        Version::Http11 => !connection_has("close"),
        Version::Http10 => connection_has("keep-alive") && !connection_has("close"),
    };
    let expects_continue = version == Version::Http11
        && headers
            .iter()
            .any(|(n, v)| n == "expect" && v.eq_ignore_ascii_case("100-continue"));
    Ok(RequestHead {
        method,
        target,
        version,
        headers,
        framing,
        keep_alive,
        expects_continue,
    })
}

fn request_line_parts(line: &[u8]) -> Result<(String, String, Version), HeadError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed(
            "the request line is not: method, target, version",
        ));
    };
    if !is_token(method) {
        return Err(HeadError::Malformed("invalid method"));
    }
    if target.is_empty() || target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(HeadError::Malformed("invalid request target"));
    }
    let version = match version {
        b"HTTP/1.1" => Version::Http11,
        b"HTTP/1.0" => Version::Http10,
        v if v.starts_with(b"HTTP/") => return Err(HeadError::Version),
        _ => return Err(HeadError::Malformed("invalid HTTP version")),
    };
    let method = String::from_utf8_lossy(method).to_ascii_uppercase();
    // Visible ASCII only (checked above, apart from bytes past 0x7f, which are not UTF-8 on
    // their own and are kept as the replacement character).
    let target = String::from_utf8_lossy(target).into_owned();
    Ok((method, target, version))
}

/// One `name: value` field line.
fn field(line: &[u8]) -> Result<(String, String), HeadError> {
    if line[0] == b' ' || line[0] == b'\t' {
        return Err(HeadError::Malformed("folded header lines are not accepted"));
    }
    let colon = memchr::memchr(b':', line).ok_or(HeadError::Malformed("a header without ':'"))?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if !is_token(name) {
        return Err(HeadError::Malformed("invalid header name"));
    }
    if value
        .iter()
        .any(|&b| b == 0 || (b < b' ' && b != b'\t') || b == 0x7f)
    {
        return Err(HeadError::Malformed(
            "a control character in a header value",
        ));
    }
    let value = value.trim_ascii();
    Ok((
        String::from_utf8_lossy(name).to_ascii_lowercase(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

/// The comma-separated values of every field named `name`, each trimmed.
fn list_values<'h>(headers: &'h [(String, String)], name: &str) -> Vec<&'h str> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .collect()
}

/// The body's framing (RFC 9112 § 6.3), refusing every head a proxy might frame otherwise.
fn framing(headers: &[(String, String)], version: Version) -> Result<BodyFraming, HeadError> {
    let codings = list_values(headers, "transfer-encoding");
    let lengths = list_values(headers, "content-length");
    if !codings.is_empty() {
        if !lengths.is_empty() {
            return Err(HeadError::Malformed(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if version == Version::Http10 {
            return Err(HeadError::Malformed(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if codings.len() != 1 || !codings[0].eq_ignore_ascii_case("chunked") {
            return Err(HeadError::TransferEncoding);
        }
        return Ok(BodyFraming::Chunked);
    }
    let Some(first) = lengths.first() else {
        return Ok(BodyFraming::Empty);
    };
    if lengths.iter().any(|l| l != first) {
        return Err(HeadError::Malformed("differing Content-Length values"));
    }
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HeadError::Malformed("invalid Content-Length"));
    }
    match first.parse::<u64>() {
        Ok(0) => Ok(BodyFraming::Empty),
        Ok(n) => Ok(BodyFraming::Length(n)),
        Err(_) => Err(HeadError::Malformed("invalid Content-Length")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<RequestHead, HeadError> {
        let bytes = text.as_bytes();
        let skip = leading_empty_lines(bytes);
        let end = head_end(&bytes[skip..], 0).expect("a complete head");
        assert_eq!(
            skip + end,
            bytes.len(),
            "the test head has bytes after its end"
        );
        parse(&bytes[skip..skip + end])
    }

    fn assert_malformed(head: &str) {
        assert!(
            matches!(parsed(head), Err(HeadError::Malformed(_))),
            "accepted: {head:?}"
        );
    }

    #[test]
    fn a_plain_get() {
        let head =
            parsed("get /api/runbooks?x=1 HTTP/1.1\r\nHost: a\r\nX-Thing:  b c \r\n\r\n").unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.target, "/api/runbooks?x=1");
        assert_eq!(head.version, Version::Http11);
        assert_eq!(
            head.headers,
            vec![
                ("host".into(), "a".into()),
                ("x-thing".into(), "b c".into())
            ]
        );
        assert_eq!(head.framing, BodyFraming::Empty);
        assert!(head.keep_alive);
        assert!(!head.expects_continue);
    }

    #[test]
    fn bare_line_feeds_and_leading_empty_lines_are_accepted() {
        let head = parsed("\r\n\nPOST /x HTTP/1.1\nContent-Length: 5\n\n").unwrap();
        assert_eq!(head.framing, BodyFraming::Length(5));
    }

    #[test]
    fn the_end_is_found_across_pieces() {
        let text = b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest";
        for cut in 0..text.len() {
            let found = head_end(&text[..cut], 0).or_else(|| head_end(text, cut));
            assert_eq!(found, Some(text.len() - 4), "cut at {cut}");
        }
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
        // A caller's count past the end is no reason to fail.
        assert_eq!(head_end(b"GET", 100), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n", 100), Some(16));
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        let close = parsed("GET / HTTP/1.1\r\nConnection: Upgrade, Close\r\n\r\n").unwrap();
        assert!(!close.keep_alive);
        let old = parsed("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(!old.keep_alive);
        let old_kept = parsed("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert!(old_kept.keep_alive);
        let upgrade = parsed("GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n").unwrap();
        assert!(upgrade.keep_alive);
    }

    #[test]
    fn expect_continue_only_in_http11() {
        let head =
            parsed("POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n").unwrap();
        assert!(head.expects_continue);
        let old =
            parsed("POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n").unwrap();
        assert!(!old.expects_continue);
    }

    #[test]
    fn framing_is_unambiguous() {
        let chunked = parsed("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap();
        assert_eq!(chunked.framing, BodyFraming::Chunked);
        let same =
            parsed("POST / HTTP/1.1\r\nContent-Length: 7\r\nContent-Length: 7, 7\r\n\r\n").unwrap();
        assert_eq!(same.framing, BodyFraming::Length(7));
        let zero = parsed("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!(zero.framing, BodyFraming::Empty);
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_malformed(bad);
        }
        for bad in [
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
        ] {
            assert_eq!(parsed(bad), Err(HeadError::TransferEncoding), "{bad:?}");
        }
    }

    #[test]
    fn malformed_heads_are_refused() {
        for bad in [
            "GET /\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1 x\r\n\r\n",
            "G(T / HTTP/1.1\r\n\r\n",
            "GET / HTP/1.1\r\n\r\n",
            "GET /a\x01b HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nNo colon\r\n\r\n",
            "GET / HTTP/1.1\r\n: empty name\r\n\r\n",
            "GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
            "GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n",
        ] {
            assert_malformed(bad);
        }
        assert_eq!(parsed("GET / HTTP/2.0\r\n\r\n"), Err(HeadError::Version));
        assert_eq!(parsed("GET / HTTP/1.2\r\n\r\n"), Err(HeadError::Version));
    }

    #[test]
    fn size_and_field_count_are_bounded() {
        let many: String = (0..=MAX_HEADER_FIELDS)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        assert_eq!(
            parsed(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Err(HeadError::TooLarge)
        );
        let huge = "v".repeat(MAX_HEAD_BYTES);
        assert_eq!(
            parsed(&format!("GET / HTTP/1.1\r\nX: {huge}\r\n\r\n")),
            Err(HeadError::TooLarge)
        );
        let enough: String = (0..MAX_HEADER_FIELDS)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        assert!(parsed(&format!("GET / HTTP/1.1\r\n{enough}\r\n")).is_ok());
    }

    #[test]
    fn obs_text_in_values_is_kept_lossily() {
        let head = parsed("GET / HTTP/1.1\r\nX: café\r\n\r\n").unwrap();
        assert_eq!(head.headers[0].1, "café");
    }
}
