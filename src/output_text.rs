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
    if memchr::memchr(b'\r', text.as_bytes()).is_none() {
        return text;
    }
    Cow::Owned(text.replace("\r\n", "\n").replace('\r', "\n"))
}

/// Escaped bytes gathered before they are written on (one `write_all` per this much, not one
/// per escaped character: multi-line output has an escape every few bytes).
const ESCAPE_BATCH: usize = 64 * 1024;

/// The escape of a byte JSON does not allow in a string as it is; None for the others.
fn escape_of(b: u8) -> Option<&'static [u8]> {
    match b {
        b'"' => Some(b"\\\""),
        b'\\' => Some(b"\\\\"),
        b'\n' => Some(b"\\n"),
        b'\r' => Some(b"\\r"),
        b'\t' => Some(b"\\t"),
        0x08 => Some(b"\\b"),
        0x0c => Some(b"\\f"),
        _ => None,
    }
}

/// Writes `text` JSON-escaped, without surrounding quotes. The bytes to escape are found with a
/// vectorised search for the common ones (`"`, `\`, newline) and a vectorised check of each
/// stretch between them for other control characters.
pub fn write_json_escaped(out: &mut impl Write, text: &str) -> io::Result<()> {
    let bytes = text.as_bytes();
    let mut batch: Vec<u8> = Vec::new();
    // Bytes before `start` are written or in `batch`.
    let mut start = 0;
    let mut escape_at = |batch: &mut Vec<u8>, start: &mut usize, i: usize| -> io::Result<()> {
        if batch.capacity() == 0 {
            batch.reserve(ESCAPE_BATCH.min(bytes.len() + bytes.len() / 4) + 8);
        }
        batch.extend_from_slice(&bytes[*start..i]);
        match escape_of(bytes[i]) {
            Some(e) => batch.extend_from_slice(e),
            None => write!(batch, "\\u{:04x}", bytes[i])?,
        }
        *start = i + 1;
        if batch.len() >= ESCAPE_BATCH {
            out.write_all(batch)?;
            batch.clear();
        }
        Ok(())
    };
    let mut from = 0;
    loop {
        let next = memchr::memchr3(b'\n', b'"', b'\\', &bytes[from..]).map(|at| from + at);
        let stretch_end = next.unwrap_or(bytes.len());
        if bytes[from..stretch_end].iter().any(|&b| b < 0x20) {
            let controls = bytes[from..stretch_end]
                .iter()
                .enumerate()
                .filter(|(_, &b)| b < 0x20)
                .map(|(at, _)| from + at);
            for i in controls {
                escape_at(&mut batch, &mut start, i)?;
            }
        }
        let Some(i) = next else { break };
        escape_at(&mut batch, &mut start, i)?;
        from = i + 1;
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
    fn every_ascii_byte_is_escaped_as_serde_does() {
        for first in 0u8..0x80 {
            for second in [b'a', b'"', b'\\', b'\n', 0x01, 0x1f, 0x7f] {
                let text = String::from_utf8(vec![b'x', first, second, first, b'y']).unwrap();
                let mut out = vec![b'"'];
                write_json_escaped(&mut out, &text).unwrap();
                out.push(b'"');
                assert_eq!(out, serde_json::to_vec(&text).unwrap(), "{text:?}");
            }
        }
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
