//! How output bytes become text for clients: lossy UTF-8 decoding (U+FFFD for invalid bytes),
//! CR and CRLF turned into LF, and JSON string escaping that can be applied piece by piece.
#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::io::{self, Write};

/// Lossy-decodes `bytes` and turns CRLF and lone CR into LF.
pub fn normalize(bytes: &[u8]) -> Cow<'_, str> {
    // Valid UTF-8 without CR (nearly all output) is checked by the fast validator alone.
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    };
    if !text.as_bytes().contains(&b'\r') {
        return text;
    }
    Cow::Owned(text.replace("\r\n", "\n").replace('\r', "\n"))
}

/// Escaped bytes gathered before they are written on (one `write_all` per this much, not one
/// per escaped character: multi-line output has an escape every few bytes).
const ESCAPE_BATCH: usize = 64 * 1024;

/// Writes `text` JSON-escaped, without surrounding quotes.
pub fn write_json_escaped(out: &mut impl Write, text: &str) -> io::Result<()> {
    let bytes = text.as_bytes();
    let mut batch: Vec<u8> = Vec::new();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        if batch.capacity() == 0 {
            batch.reserve(ESCAPE_BATCH.min(bytes.len() + bytes.len() / 4) + 8);
        }
        batch.extend_from_slice(&bytes[start..i]);
        match escape {
            Some(e) => batch.extend_from_slice(e),
            None => write!(batch, "\\u{:04x}", b)?,
        }
        start = i + 1;
        if batch.len() >= ESCAPE_BATCH {
            out.write_all(&batch)?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        out.write_all(&batch)?;
    }
    out.write_all(&bytes[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_normalized() {
        assert_eq!(normalize(b"a\r\nb\rc\n"), "a\nb\nc\n");
        assert_eq!(normalize(b"plain"), "plain");
    }

    #[test]
    fn invalid_bytes_replaced() {
        assert_eq!(normalize(b"a\xffb"), "a\u{fffd}b");
    }

    #[test]
    fn escaping_matches_serde() {
        let text = "quote\" back\\ nl\n tab\t bell\u{7} é €";
        let mut out = Vec::new();
        out.push(b'"');
        write_json_escaped(&mut out, text).unwrap();
        out.push(b'"');
        let parsed: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed, text);
    }

    #[test]
    fn escaping_in_batches_keeps_the_order() {
        let text = format!("{}\"tail without escapes", "line\t\u{1}\n".repeat(30_000));
        let mut out = Vec::new();
        out.push(b'"');
        write_json_escaped(&mut out, &text).unwrap();
        out.push(b'"');
        let parsed: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed, text);
        assert_eq!(out, serde_json::to_vec(&text).unwrap());
    }
}
