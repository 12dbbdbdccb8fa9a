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

/// What a byte becomes in a JSON string: 0 for itself, `u` for `\u00XX`, else the letter
/// after the backslash.
const ESCAPES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = b'u';
        b += 1;
    }
    table[b'\n' as usize] = b'n';
    table[b'\r' as usize] = b'r';
    table[b'\t' as usize] = b't';
    table[0x08] = b'b';
    table[0x0c] = b'f';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Whether any of the 8 bytes in `word` needs an escape (a control character, `"` or `\`):
/// the zero-byte test of the bit-twiddling folklore, applied to each condition.
fn any_to_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word;
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x;
    (below_space | zero_in(quote) | zero_in(backslash)) & HIGHS != 0
}

/// Writes `text` JSON-escaped, without surrounding quotes, as serde_json escapes strings. Eight
/// bytes are checked at once, and only a group holding a byte to escape is looked at byte by
/// byte: output with a line break every few bytes (one escape each) costs a table lookup per
/// byte, not a search per escape.
pub fn write_json_escaped(out: &mut impl Write, text: &str) -> io::Result<()> {
    let bytes = text.as_bytes();
    let mut batch: Vec<u8> =
        Vec::with_capacity(ESCAPE_BATCH.min(bytes.len() + bytes.len() / 4) + 8);
    // Bytes before `start` are in `batch` or written.
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(group) = bytes.get(i..i + 8) {
            let word = u64::from_le_bytes(group.try_into().unwrap_or_default());
            if !any_to_escape(word) {
                i += 8;
                continue;
            }
        }
        let end = (i + 8).min(bytes.len());
        for at in i..end {
            let b = bytes[at];
            let escape = ESCAPES[usize::from(b)];
            if escape == 0 {
                continue;
            }
            batch.extend_from_slice(&bytes[start..at]);
            if escape == b'u' {
                batch.extend_from_slice(b"\\u00");
                batch.push(HEX_DIGITS[usize::from(b >> 4)]);
                batch.push(HEX_DIGITS[usize::from(b & 0xf)]);
            } else {
                batch.extend_from_slice(&[b'\\', escape]);
            }
            start = at + 1;
        }
        i = end;
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

    /// Checks `text` escaped in quotes against serde_json's string.
    fn assert_escaped_as_serde_does(text: &str) {
        let mut out = vec![b'"'];
        write_json_escaped(&mut out, text).unwrap();
        out.push(b'"');
        assert_eq!(out, serde_json::to_vec(text).unwrap(), "{text:?}");
    }

    #[test]
    fn every_ascii_byte_is_escaped_as_serde_does() {
        for first in 0u8..0x80 {
            for second in [b'a', b'"', b'\\', b'\n', 0x01, 0x1f, 0x7f] {
                let text = String::from_utf8(vec![b'x', first, second, first, b'y']).unwrap();
                assert_escaped_as_serde_does(&text);
            }
        }
    }

    #[test]
    fn every_byte_at_every_place_of_a_group_is_escaped_as_serde_does() {
        // Long enough for the eight-at-a-time check: each character at each offset, among
        // plain ASCII and multi-byte characters.
        let mut specials: Vec<String> = (0u8..0x80).map(|b| char::from(b).to_string()).collect();
        specials.extend(["é", "€", "😀", "\u{7f}", "\u{80}", "\u{2028}"].map(String::from));
        for special in &specials {
            for place in 0..20 {
                for filler in ["abcdefgh", "é€xyzzy€"] {
                    let mut text: String = filler.repeat(3).chars().take(place).collect();
                    text.push_str(special);
                    text.push_str(&filler.repeat(2));
                    assert_escaped_as_serde_does(&text);
                }
            }
        }
    }

    #[test]
    fn any_to_escape_finds_each_kind_in_each_byte() {
        for place in 0..8 {
            for b in 0u8..=255 {
                let mut group = *b"abcdefgh";
                group[place] = b;
                let expected = b < 0x20 || b == b'"' || b == b'\\';
                assert_eq!(
                    any_to_escape(u64::from_le_bytes(group)),
                    expected,
                    "{b:#x} at {place}"
                );
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
