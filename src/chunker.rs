//! Cuts a pipe's byte stream into chunks that each decode on their own: a chunk never ends inside
//! a UTF-8 character or between CR and LF, and never inside a secret that must be masked. The few
//! bytes held back wait for the next read, or are released by `flush` (the reader calls it when
//! nothing followed within `HOLD_BACK_RELEASE`).

use std::time::Duration;

/// How long held-back bytes may wait for the bytes that complete them.
pub const HOLD_BACK_RELEASE: Duration = Duration::from_millis(10);

/// What replaces a masked secret in stored and sent output.
pub const MASK: &[u8] = b"***";

/// Splits one stream; holds back an incomplete tail between calls.
#[derive(Debug, Default)]
pub struct Chunker {
    held: Vec<u8>,
    secret: Option<Vec<u8>>,
}

impl Chunker {
    /// `secret`: bytes to replace by `***` wherever they appear (None or empty: mask nothing).
    pub fn new(secret: Option<&[u8]>) -> Chunker {
        Chunker {
            held: Vec::new(),
            secret: secret.filter(|s| !s.is_empty()).map(<[u8]>::to_vec),
        }
    }

    /// True when bytes are waiting for their continuation.
    pub fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Feeds bytes just read; returns the chunk that may be sent now (possibly empty).
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(data);
        let mut buf = self.mask(buf);
        let keep = self.safe_end(&buf);
        self.held = buf.split_off(keep);
        buf
    }

    /// Releases whatever is held back, as it is.
    pub fn flush(&mut self) -> Vec<u8> {
        let held = std::mem::take(&mut self.held);
        self.mask(held)
    }

    fn mask(&self, buf: Vec<u8>) -> Vec<u8> {
        let Some(secret) = &self.secret else {
            return buf;
        };
        if buf.len() < secret.len() {
            return buf;
        }
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        while i < buf.len() {
            if buf[i..].starts_with(secret) {
                out.extend_from_slice(MASK);
                i += secret.len();
            } else {
                out.push(buf[i]);
                i += 1;
            }
        }
        out
    }

    /// Length of the longest prefix of `buf` that may end a chunk.
    fn safe_end(&self, buf: &[u8]) -> usize {
        let mut end = buf.len();
        // A trailing proper prefix of the secret might be completed by the next read.
        if let Some(secret) = &self.secret {
            let longest = (secret.len() - 1).min(end);
            if let Some(n) = (1..=longest)
                .rev()
                .find(|&n| secret.starts_with(&buf[end - n..]))
            {
                end -= n;
            }
        }
        end = utf8_safe_end(&buf[..end]);
        if end > 0 && buf[end - 1] == b'\r' {
            end -= 1;
        }
        end
    }
}

/// Length of `buf` without a trailing incomplete (but so far valid) UTF-8 sequence.
pub fn utf8_safe_end(buf: &[u8]) -> usize {
    let len = buf.len();
    // Look back at most 3 bytes for the lead byte of the last character.
    for back in 1..=3.min(len) {
        let byte = buf[len - back];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte: keep looking for the lead
        }
        let needed = match byte {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return len, // ASCII or an invalid lead: nothing to complete
        };
        return if back < needed { len - back } else { len };
    }
    len
}

/// Largest cut `<= limit` in `buf` that does not split a UTF-8 character.
pub fn utf8_floor(buf: &[u8], limit: usize) -> usize {
    if limit >= buf.len() {
        return buf.len();
    }
    let mut cut = limit;
    // Step back over continuation bytes (at most 3) to the start of the character.
    while cut > 0 && limit - cut < 3 && buf[cut] & 0b1100_0000 == 0b1000_0000 {
        cut -= 1;
    }
    if buf[cut] & 0b1100_0000 == 0b1000_0000 {
        limit // not valid UTF-8 here anyway: cut where asked
    } else {
        cut
    }
}

/// Length of `buf` from the first character start at or after `start` (for tails).
pub fn utf8_ceil(buf: &[u8], start: usize) -> usize {
    let mut cut = start.min(buf.len());
    let mut steps = 0;
    while cut < buf.len() && steps < 3 && buf[cut] & 0b1100_0000 == 0b1000_0000 {
        cut += 1;
        steps += 1;
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(chunker: &mut Chunker, parts: &[&[u8]]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| chunker.push(p)).collect()
    }

    #[test]
    fn whole_text_passes_through() {
        let mut c = Chunker::new(None);
        assert_eq!(c.push(b"hello\n"), b"hello\n");
        assert!(!c.is_holding());
    }

    #[test]
    fn multibyte_character_split_across_reads() {
        let mut c = Chunker::new(None);
        let euro = "€".as_bytes(); // E2 82 AC
        let out = feed(&mut c, &[&[b'a', euro[0]], &[euro[1]], &[euro[2], b'b']]);
        assert_eq!(out[0], b"a");
        assert!(out[1].is_empty());
        assert_eq!(out[2], "€b".as_bytes());
        for chunk in &out {
            assert!(std::str::from_utf8(chunk).is_ok());
        }
    }

    #[test]
    fn four_byte_character_held_at_most_three_bytes() {
        let mut c = Chunker::new(None);
        let emoji = "😀".as_bytes();
        assert!(c.push(&emoji[..3]).is_empty());
        assert_eq!(c.flush(), &emoji[..3]);
    }

    #[test]
    fn cr_is_not_separated_from_lf() {
        let mut c = Chunker::new(None);
        assert_eq!(c.push(b"line\r"), b"line");
        assert!(c.is_holding());
        assert_eq!(c.push(b"\nnext"), b"\r\nnext");
    }

    #[test]
    fn lone_cr_released_by_flush() {
        let mut c = Chunker::new(None);
        assert_eq!(c.push(b"50%\r"), b"50%");
        assert_eq!(c.flush(), b"\r");
        assert!(!c.is_holding());
    }

    #[test]
    fn invalid_bytes_are_not_held() {
        let mut c = Chunker::new(None);
        assert_eq!(c.push(b"x\xff"), b"x\xff");
        assert_eq!(c.push(b"\x80"), b"\x80");
    }

    #[test]
    fn secret_masked_within_and_across_reads() {
        let mut c = Chunker::new(Some(b"TOKEN123"));
        assert_eq!(c.push(b"a TOKEN123 b"), b"a *** b");
        let first = c.push(b"x TOK");
        assert_eq!(first, b"x ");
        let second = c.push(b"EN123 y");
        assert_eq!(second, b"*** y");
        // A prefix that turns out not to be the secret is released unchanged.
        assert_eq!(c.push(b"TOKE"), b"");
        assert_eq!(c.push(b"X"), b"TOKEX");
    }

    #[test]
    fn floor_and_ceil_respect_characters() {
        let text = "a€b".as_bytes(); // a E2 82 AC b
        assert_eq!(utf8_floor(text, 2), 1);
        assert_eq!(utf8_floor(text, 4), 4);
        assert_eq!(utf8_floor(text, 10), 5);
        assert_eq!(utf8_ceil(text, 2), 4);
        assert_eq!(utf8_ceil(text, 1), 1);
    }

    #[test]
    fn safe_end_examples() {
        assert_eq!(utf8_safe_end(b"ab"), 2);
        assert_eq!(utf8_safe_end(&[b'a', 0xE2, 0x82]), 1);
        assert_eq!(utf8_safe_end(&[0xE2, 0x82, 0xAC]), 3);
        assert_eq!(utf8_safe_end(&[0xF0, 0x9F, 0x98]), 0);
    }
}
