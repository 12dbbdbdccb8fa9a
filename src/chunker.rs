//! Cuts a pipe's byte stream into chunks that each decode on their own: a chunk never ends inside
//! a UTF-8 character or between CR and LF, and never inside a secret that must be masked. The few
//! bytes held back wait for the next read; what the reader may release after
//! `HOLD_BACK_RELEASE` of silence is given by `release_timed`, the rest only by `finish` at the
//! end of the stream:
//! - an incomplete UTF-8 character (still valid so far) is never released by the timer: only
//!   when the next bytes complete it or prove it invalid, or at the end;
//! - a trailing CR may be released by the timer; an LF that then starts the next read is
//!   dropped, as the CR already was that line break (text views show CR as a line break);
//! - a tail that matches only the secret's first segment (a JWT's constant header, before the
//!   first '.') may be released by the timer, and the rest of the secret is still masked if it
//!   follows; a tail that reaches past that segment waits, and at the end is masked.
#![forbid(unsafe_code)]

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
    /// Searches for `secret` (vectorised: output is scanned whole for it).
    finder: Option<memchr::memmem::Finder<'static>>,
    /// Length of the secret's first segment (before its first '.'): a held prefix of the
    /// secret no longer than this may be released by the timer.
    public_len: usize,
    /// The output released so far ends with this many bytes of the secret's start (let go by
    /// the timer); `held` continues them.
    sent_prefix: usize,
    /// The last byte released by the timer was a CR.
    sent_cr: bool,
}

impl Chunker {
    /// `secret`: bytes to replace by `***` wherever they appear (None or empty: mask nothing).
    pub fn new(secret: Option<&[u8]>) -> Chunker {
        let secret = secret.filter(|s| !s.is_empty()).map(<[u8]>::to_vec);
        let public_len = secret
            .as_deref()
            .and_then(|s| s.iter().position(|&b| b == b'.'))
            .unwrap_or(0);
        let finder = secret
            .as_deref()
            .map(|s| memchr::memmem::Finder::new(s).into_owned());
        Chunker {
            secret,
            finder,
            public_len,
            ..Chunker::default()
        }
    }

    /// True when some held bytes may be released by the timer (`release_timed` would give
    /// something): the reader then waits at most `HOLD_BACK_RELEASE` for more.
    pub fn has_timed_release(&self) -> bool {
        !self.held.is_empty() && self.timed_keep() < self.held.len()
    }

    /// Feeds bytes just read; returns the chunk that may be sent now (possibly empty).
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(data);
        self.push_joined(buf)
    }

    /// [`Chunker::push`] for bytes the caller gives up: with nothing held back (the usual
    /// case) they become the chunk without a copy.
    pub fn push_owned(&mut self, data: Vec<u8>) -> Vec<u8> {
        if self.held.is_empty() {
            self.push_joined(data)
        } else {
            self.push(&data)
        }
    }

    /// The held bytes followed by the new ones, in `buf`.
    fn push_joined(&mut self, mut buf: Vec<u8>) -> Vec<u8> {
        if std::mem::take(&mut self.sent_cr) && buf.first() == Some(&b'\n') {
            buf.remove(0);
        }
        let mut out = Vec::new();
        if self.sent_prefix > 0 {
            if let Some(rest) = self.secret.as_deref().map(|s| &s[self.sent_prefix..]) {
                if buf.starts_with(rest) {
                    // The secret completed: its start is out already, the rest is masked.
                    out.extend_from_slice(MASK);
                    buf.drain(..rest.len());
                } else if rest.starts_with(&buf) {
                    self.held = buf;
                    return out;
                }
            }
            self.sent_prefix = 0;
        }
        let mut buf = self.mask(buf);
        let keep = self.safe_end(&buf);
        self.held = buf.split_off(keep);
        if out.is_empty() {
            return buf;
        }
        out.extend_from_slice(&buf);
        out
    }

    /// What the timer may release of the held bytes (see the module notes); the rest stays.
    pub fn release_timed(&mut self) -> Vec<u8> {
        let keep = self.timed_keep();
        if keep == self.held.len() {
            return Vec::new();
        }
        let kept = self.held.split_off(self.held.len() - keep);
        let released = std::mem::replace(&mut self.held, kept);
        self.sent_prefix = if self.sent_prefix > 0 {
            self.sent_prefix + released.len()
        } else {
            self.secret_tail(&released)
        };
        self.sent_cr = released.last() == Some(&b'\r');
        released
    }

    /// Releases whatever is held back at the end of the stream; a held prefix of the secret
    /// that reaches past its first segment is masked.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut held = std::mem::take(&mut self.held);
        let sent = std::mem::take(&mut self.sent_prefix);
        if self.secret.is_none() || held.is_empty() {
            return held;
        }
        if sent > 0 {
            return if sent + held.len() > self.public_len {
                MASK.to_vec()
            } else {
                held
            };
        }
        let n = self.secret_tail(&held);
        if n > self.public_len {
            held.truncate(held.len() - n);
            held.extend_from_slice(MASK);
        }
        held
    }

    /// How many bytes at the end of `held` the timer must not release.
    fn timed_keep(&self) -> usize {
        let held = &self.held;
        if self.sent_prefix > 0 {
            // All of `held` continues a secret prefix already sent.
            return if self.sent_prefix + held.len() > self.public_len {
                held.len()
            } else {
                0
            };
        }
        let n = self.secret_tail(held);
        if n > self.public_len {
            return n;
        }
        let body = &held[..held.len() - n];
        if n == 0 {
            // Only an incomplete character can still be waiting (a CR may go).
            return body.len() - utf8_safe_end(body);
        }
        0
    }

    /// Length of the longest proper prefix of the secret that `buf` ends with.
    fn secret_tail(&self, buf: &[u8]) -> usize {
        let Some(secret) = &self.secret else {
            return 0;
        };
        let longest = (secret.len() - 1).min(buf.len());
        (1..=longest)
            .rev()
            .find(|&n| secret.starts_with(&buf[buf.len() - n..]))
            .unwrap_or(0)
    }

    /// `buf` with every occurrence of the secret (leftmost first, not overlapping) replaced by
    /// `MASK`. Only positions holding the secret's first byte are compared, and `buf` is
    /// returned as it is when nothing matched.
    fn mask(&self, buf: Vec<u8>) -> Vec<u8> {
        let (Some(secret), Some(finder)) = (&self.secret, &self.finder) else {
            return buf;
        };
        if buf.len() < secret.len() {
            return buf;
        }
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        let mut i = 0;
        while let Some(at) = finder.find(&buf[i..]) {
            let start = i + at;
            let out = out.get_or_insert_with(|| Vec::with_capacity(buf.len()));
            out.extend_from_slice(&buf[copied..start]);
            out.extend_from_slice(MASK);
            i = start + secret.len();
            copied = i;
        }
        match out {
            None => buf,
            Some(mut out) => {
                out.extend_from_slice(&buf[copied..]);
                out
            }
        }
    }

    /// Length of the longest prefix of `buf` that may end a chunk.
    fn safe_end(&self, buf: &[u8]) -> usize {
        // A trailing proper prefix of the secret might be completed by the next read.
        let mut end = buf.len() - self.secret_tail(buf);
        end = utf8_safe_end(&buf[..end]);
        if end > 0 && buf[end - 1] == b'\r' {
            end -= 1;
        }
        end
    }
}

/// Length of `buf` without a trailing incomplete UTF-8 sequence that is valid so far (one the
/// next bytes may complete); an invalid tail is not held.
pub fn utf8_safe_end(buf: &[u8]) -> usize {
    let len = buf.len();
    // Look back at most 3 bytes for the lead byte of the last character.
    for back in 1..=3.min(len) {
        let byte = buf[len - back];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte: keep looking for the lead
        }
        if !(0xC2..=0xF4).contains(&byte) {
            return len; // ASCII or an invalid lead: nothing to complete
        }
        return match std::str::from_utf8(&buf[len - back..]) {
            // Cut short, not wrong: the rest may follow.
            Err(e) if e.valid_up_to() == 0 && e.error_len().is_none() => len - back,
            _ => len,
        };
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
    fn owned_pushes_give_what_borrowed_ones_give() {
        let secret: &[u8] = b"eyJhbGciOi.payload.signature";
        let mut text = Vec::new();
        for _ in 0..40 {
            text.extend_from_slice(
                b"caf\xc3\xa9 eyJhbGciOi.payload.signature\r\nend \xe2\x82\xac\r",
            );
        }
        for cut in [1, 3, 7, 64, 1000] {
            let (mut borrowed, mut owned) =
                (Chunker::new(Some(secret)), Chunker::new(Some(secret)));
            let (mut by_ref, mut by_value) = (Vec::new(), Vec::new());
            for piece in text.chunks(cut) {
                by_ref.extend(borrowed.push(piece));
                by_value.extend(owned.push_owned(piece.to_vec()));
            }
            by_ref.extend(borrowed.finish());
            by_value.extend(owned.finish());
            assert_eq!(by_value, by_ref, "pieces of {cut}");
            assert!(!by_value.windows(secret.len()).any(|w| w == secret));
            assert_eq!(by_value.windows(3).filter(|w| *w == MASK).count(), 40);
        }
    }

    #[test]
    fn whole_text_passes_through() {
        let mut c = Chunker::new(None);
        assert_eq!(c.push(b"hello\n"), b"hello\n");
        assert!(!c.has_timed_release());
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
    fn incomplete_character_is_not_released_by_the_timer() {
        let mut c = Chunker::new(None);
        let emoji = "😀".as_bytes();
        assert!(c.push(&emoji[..3]).is_empty());
        assert!(!c.has_timed_release());
        assert!(c.release_timed().is_empty());
        assert_eq!(c.push(&emoji[3..]), emoji);
        // At the end of the stream an unfinished character goes out as it is.
        assert!(c.push(&emoji[..2]).is_empty());
        assert_eq!(c.finish(), &emoji[..2]);
        assert!(!c.has_timed_release());
    }

    #[test]
    fn cr_is_not_separated_from_lf() {
        let mut c = Chunker::new(None);
        assert_eq!(c.push(b"line\r"), b"line");
        assert!(c.has_timed_release());
        assert_eq!(c.push(b"\nnext"), b"\r\nnext");
    }

    #[test]
    fn lone_cr_released_by_timer_then_lf_adds_no_break() {
        let mut c = Chunker::new(None);
        assert_eq!(c.push(b"50%\r"), b"50%");
        assert_eq!(c.release_timed(), b"\r");
        assert!(!c.has_timed_release());
        // The CR was the line break: the LF that completes the CRLF is dropped, once.
        assert_eq!(c.push(b"\nnext\n"), b"next\n");
        assert_eq!(c.push(b"\nmore"), b"\nmore");
        // A CR followed by anything else keeps what follows.
        assert_eq!(c.push(b"\r"), b"");
        assert_eq!(c.release_timed(), b"\r");
        assert_eq!(c.push(b"60%"), b"60%");
    }

    #[test]
    fn cr_goes_on_the_timer_but_a_character_after_it_waits() {
        let mut c = Chunker::new(None);
        let euro = "€".as_bytes();
        assert_eq!(c.push(&[b'a', b'\r', euro[0], euro[1]]), b"a");
        assert_eq!(c.release_timed(), b"\r");
        assert!(!c.has_timed_release());
        assert_eq!(c.push(&euro[2..]), euro);
    }

    #[test]
    fn invalid_bytes_are_not_held() {
        let mut c = Chunker::new(None);
        assert_eq!(c.push(b"x\xff"), b"x\xff");
        assert_eq!(c.push(b"\x80"), b"\x80");
        // A lead byte followed by a byte that cannot continue it is resolved at once.
        assert_eq!(c.push(b"\xe0\x80"), b"\xe0\x80");
        assert_eq!(c.push(b"\xe2"), b"");
        assert_eq!(c.push(b"A"), b"\xe2A");
    }

    #[test]
    fn mask_finds_every_occurrence_among_near_misses() {
        let chunker = Chunker::new(Some(b"ab.cd"));
        assert_eq!(
            chunker.mask(b"xaab.cdab.cab.cdzab.cd".to_vec()),
            b"xa***ab.c***z***".to_vec()
        );
        assert_eq!(chunker.mask(b"aaaaaaaa".to_vec()), b"aaaaaaaa".to_vec());
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

    const JWT: &[u8] = b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";

    #[test]
    fn token_header_goes_on_the_timer_and_the_rest_is_still_masked() {
        let mut c = Chunker::new(Some(JWT));
        let dot = JWT.iter().position(|&b| b == b'.').unwrap();
        assert_eq!(c.push(b"t="), b"t=");
        assert_eq!(c.push(&JWT[..dot]), b"");
        assert!(c.has_timed_release());
        assert_eq!(c.release_timed(), &JWT[..dot]);
        // The rest arrives in two pieces: held (it reaches past the header), then masked.
        assert_eq!(c.push(&JWT[dot..dot + 5]), b"");
        assert!(!c.has_timed_release());
        assert!(c.release_timed().is_empty());
        assert_eq!(c.push(&JWT[dot + 5..]), b"***");
        assert_eq!(c.push(b" end"), b" end");
    }

    #[test]
    fn token_prefix_past_the_header_waits_until_resolved_or_masked_at_the_end() {
        let dot = JWT.iter().position(|&b| b == b'.').unwrap();
        let mut c = Chunker::new(Some(JWT));
        assert_eq!(c.push(&JWT[..dot + 3]), b"");
        assert!(!c.has_timed_release());
        assert!(c.release_timed().is_empty());
        assert_eq!(c.push(&JWT[dot + 3..]), b"***");
        // Not the token after all: released as text.
        assert_eq!(c.push(&JWT[..dot + 3]), b"");
        assert_eq!(c.push(b"!"), [&JWT[..dot + 3], b"!"].concat());
        // Cut off by the end of the stream: masked.
        assert_eq!(c.push(&JWT[..JWT.len() - 1]), b"");
        assert_eq!(c.finish(), MASK);
        // A header-only prefix at the end is plain text.
        let mut c = Chunker::new(Some(JWT));
        assert_eq!(c.push(&JWT[..4]), b"");
        assert_eq!(c.finish(), &JWT[..4]);
    }

    #[test]
    fn released_header_followed_by_other_text_is_plain() {
        let dot = JWT.iter().position(|&b| b == b'.').unwrap();
        let mut c = Chunker::new(Some(JWT));
        assert_eq!(c.push(&JWT[..dot]), b"");
        assert_eq!(c.release_timed(), &JWT[..dot]);
        assert_eq!(c.push(b"."), b"");
        assert_eq!(c.push(b"x\n"), b".x\n");
        // A released piece continued on the timer, still within the header.
        let mut c = Chunker::new(Some(JWT));
        assert_eq!(c.push(&JWT[..3]), b"");
        assert_eq!(c.release_timed(), &JWT[..3]);
        assert_eq!(c.push(&JWT[3..6]), b"");
        assert_eq!(c.release_timed(), &JWT[3..6]);
        assert_eq!(c.push(&JWT[6..]), b"***");
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
        assert_eq!(utf8_safe_end(&[b'a', 0xE0, 0x80]), 3);
        assert_eq!(utf8_safe_end(&[b'a', 0xF4, 0x90]), 3);
    }
}
