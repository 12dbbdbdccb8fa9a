//! Reads one protocol line (ended by LF, an optional CR before it removed) with a length cap,
//! as HTTP status lines, header lines and chunk-size lines need.
#![forbid(unsafe_code)]

use std::io::{self, BufRead};

/// Reads one line without its terminator. `Ok(None)` when the reader is at end of input
/// before any byte of the line; end of input inside a line is `UnexpectedEof`, and a line
/// longer than `max_len` is `InvalidData`.
pub fn read_line<R: BufRead>(reader: &mut R, max_len: usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    Ok(read_line_into(reader, max_len, &mut line)?.then_some(line))
}

/// Like `read_line`, appending to `line`, which keeps what was read when an error (such as a
/// read timeout) interrupts the line, so a later call can go on where this one stopped.
/// `Ok(false)` at end of input before any byte of the line.
pub fn read_line_into<R: BufRead>(
    reader: &mut R,
    max_len: usize,
    line: &mut Vec<u8>,
) -> io::Result<bool> {
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            if line.is_empty() {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a line",
            ));
        }
        let (taken, complete) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (end + 1, true),
            None => (available.len(), false),
        };
        if line.len() + taken > max_len + 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "protocol line too long",
            ));
        }
        line.extend_from_slice(&available[..taken]);
        reader.consume(taken);
        if complete {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.len() > max_len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "protocol line too long",
                ));
            }
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_and_lf_lines_then_clean_end() {
        let mut input: &[u8] = b"one\r\ntwo\n\r\n";
        assert_eq!(read_line(&mut input, 10).unwrap().unwrap(), b"one");
        assert_eq!(read_line(&mut input, 10).unwrap().unwrap(), b"two");
        assert_eq!(read_line(&mut input, 10).unwrap().unwrap(), b"");
        assert!(read_line(&mut input, 10).unwrap().is_none());
    }

    #[test]
    fn end_inside_a_line_is_an_error() {
        let mut input: &[u8] = b"partial";
        let err = read_line(&mut input, 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn long_line_is_refused() {
        let mut input: &[u8] = b"0123456789abc\n";
        let err = read_line(&mut input, 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut exact: &[u8] = b"0123456789\r\n";
        assert_eq!(read_line(&mut exact, 10).unwrap().unwrap(), b"0123456789");
    }
}
