//! Decodes an HTTP/1.1 `Transfer-Encoding: chunked` body as a plain byte reader. The end of
//! the connection before the final zero-size chunk is an `UnexpectedEof` error, so a dropped
//! stream is never mistaken for a complete one.
#![forbid(unsafe_code)]

use std::io::{self, BufRead, Read};

use super::lines::read_line_into;

/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 8 * 1024;

/// Where the decoder is in the chunk framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// Expecting the empty line that ends a chunk's data.
    DataEnd,
    /// After the zero-size chunk, reading trailer lines up to the empty one.
    Trailers,
    /// The body is complete.
    Done,
}

/// A reader giving the payload bytes of a chunked body.
pub struct ChunkedDecoder<R> {
    inner: R,
    state: State,
    /// The size, data-end or trailer line read so far: kept across a read error such as a
    /// timeout, so reading can go on after it.
    line: Vec<u8>,
}

impl<R: BufRead> ChunkedDecoder<R> {
    pub fn new(inner: R) -> Self {
        ChunkedDecoder {
            inner,
            state: State::Size,
            line: Vec::new(),
        }
    }

    fn required_line(&mut self) -> io::Result<Vec<u8>> {
        match read_line_into(&mut self.inner, MAX_LINE, &mut self.line)? {
            true => Ok(std::mem::take(&mut self.line)),
            false => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a chunked body",
            )),
        }
    }
}

/// Parses a chunk-size line: hex digits, optionally followed by `;extensions` or whitespace.
fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let invalid = || io::Error::new(io::ErrorKind::InvalidData, "malformed chunk size");
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid());
    }
    let rest_ok = rest
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .is_none_or(|first| rest[first] == b';');
    if !rest_ok {
        return Err(invalid());
    }
    let text = std::str::from_utf8(digits).map_err(|_| invalid())?;
    u64::from_str_radix(text, 16).map_err(|_| invalid())
}

impl<R: BufRead> Read for ChunkedDecoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Size => {
                    let line = self.required_line()?;
                    let size = parse_chunk_size(&line)?;
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(remaining) => {
                    let available = self.inner.fill_buf()?;
                    if available.is_empty() {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed inside a chunk",
                        ));
                    }
                    let wanted = usize::try_from(remaining).unwrap_or(usize::MAX);
                    let n = available.len().min(buf.len()).min(wanted);
                    buf[..n].copy_from_slice(&available[..n]);
                    self.inner.consume(n);
                    let left = remaining - n as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                    return Ok(n);
                }
                State::DataEnd => {
                    let line = self.required_line()?;
                    if !line.is_empty() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "chunk data longer than its size",
                        ));
                    }
                    self.state = State::Size;
                }
                State::Trailers => {
                    if self.required_line()?.is_empty() {
                        self.state = State::Done;
                    }
                }
                State::Done => return Ok(0),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    /// A reader that hands out its bytes in pieces of the given sizes, cycling.
    struct Pieces<'a> {
        data: &'a [u8],
        sizes: Vec<usize>,
        next: usize,
    }

    impl Read for Pieces<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let size = self.sizes[self.next % self.sizes.len()];
            self.next += 1;
            let n = size.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn decode_in_pieces(encoded: &[u8], sizes: Vec<usize>) -> io::Result<Vec<u8>> {
        let pieces = Pieces {
            data: encoded,
            sizes,
            next: 0,
        };
        let mut decoder = ChunkedDecoder::new(BufReader::with_capacity(3, pieces));
        let mut out = Vec::new();
        decoder.read_to_end(&mut out)?;
        Ok(out)
    }

    const ENCODED: &[u8] =
        b"5\r\nhello\r\n1;name=value\r\n \r\nA \r\n0123456789\r\n0\r\nX-Trailer: yes\r\n\r\n";

    #[test]
    fn decodes_with_extensions_and_trailers() {
        assert_eq!(
            decode_in_pieces(ENCODED, vec![4096]).unwrap(),
            b"hello 0123456789"
        );
    }

    #[test]
    fn decodes_when_split_at_every_position() {
        for split in 1..ENCODED.len() {
            for sizes in [vec![split, ENCODED.len()], vec![split, 1]] {
                assert_eq!(
                    decode_in_pieces(ENCODED, sizes).unwrap(),
                    b"hello 0123456789",
                    "split at {split}"
                );
            }
        }
    }

    /// Hands out one byte per read, with a `WouldBlock` (a read timeout) before each.
    struct Stalling<'a> {
        data: &'a [u8],
        stalled: bool,
    }

    impl Read for Stalling<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.stalled = !self.stalled;
            if self.stalled {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = 1.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn decoding_goes_on_after_a_read_timeout_anywhere() {
        let input = Stalling {
            data: ENCODED,
            stalled: false,
        };
        let mut decoder = ChunkedDecoder::new(BufReader::with_capacity(1, input));
        let mut out = Vec::new();
        let mut buf = [0u8; 16];
        let mut timeouts = 0;
        loop {
            match decoder.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => timeouts += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(out, b"hello 0123456789");
        assert!(timeouts >= ENCODED.len(), "{timeouts}");
    }

    #[test]
    fn lf_only_framing_is_accepted() {
        let encoded = b"3\nabc\n0\n\n";
        assert_eq!(decode_in_pieces(encoded, vec![2]).unwrap(), b"abc");
    }

    #[test]
    fn the_body_ends_at_the_last_chunk() {
        let mut input: &[u8] = b"2\r\nab\r\n0\r\n\r\nNEXT";
        let mut decoder = ChunkedDecoder::new(&mut input);
        let mut out = Vec::new();
        decoder.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"ab");
        assert_eq!(input, b"NEXT");
    }

    #[test]
    fn a_cut_body_is_an_error_at_every_position() {
        for cut in 0..ENCODED.len() {
            let err = decode_in_pieces(&ENCODED[..cut], vec![1]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
        }
    }

    #[test]
    fn malformed_sizes_are_refused() {
        for bad in [
            &b"+5\r\nhello\r\n0\r\n\r\n"[..],
            b"zz\r\n",
            b"\r\n",
            b"5 x\r\nhello\r\n",
            b"11111111111111111111\r\n",
            b"2\r\nabc\r\n0\r\n\r\n",
        ] {
            let err = decode_in_pieces(bad, vec![64]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{bad:?}");
        }
    }
}
