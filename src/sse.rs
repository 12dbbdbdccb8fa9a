//! Server-Sent Events framing: turns log chunks and run events into `event:`/`id:`/`data:`
//! lines. A chunk's text is split at line breaks, one `data: ` line each, so a spec parser
//! joins them back into exactly the normalized text.
#![forbid(unsafe_code)]

use crate::output_text::normalize;
use crate::runlog::Chunk;

/// Appends one event with a text payload.
pub fn push_event(out: &mut Vec<u8>, event: &str, id: Option<u64>, data: &str) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.push(b'\n');
    if let Some(id) = id {
        out.extend_from_slice(format!("id: {id}\n").as_bytes());
    }
    let bytes = data.as_bytes();
    // Each line costs 7 bytes more: "data: " and its newline.
    out.reserve(bytes.len() + bytes.len() / 8 + 16);
    let mut start = 0;
    while let Some(end) = next_line_end(bytes, start) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&bytes[start..=end]);
        start = end + 1;
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&bytes[start..]);
    out.extend_from_slice(b"\n\n");
}

/// Groups of eight bytes looked at for a line end before the vectorised search takes over.
const SHORT_LINE_GROUPS: usize = 4;

/// Where the next `\n` at or after `from` is. Output lines are mostly short: the first
/// `SHORT_LINE_GROUPS` groups of eight bytes are checked a word at a time (cheaper than
/// starting a vectorised search per line), the rest by `memchr`.
fn next_line_end(bytes: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut at = from;
    for _ in 0..SHORT_LINE_GROUPS {
        let Some(group) = bytes.get(at..at + 8) else {
            break;
        };
        let word = u64::from_le_bytes(group.try_into().unwrap_or_default()) ^ (ONES * 0x0a);
        // Its lowest set bit marks the first zero byte (a borrow only reaches higher ones).
        let zeros = word.wrapping_sub(ONES) & !word & HIGHS;
        if zeros != 0 {
            return Some(at + (zeros.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    let rest = bytes.get(at..)?;
    memchr::memchr(b'\n', rest).map(|i| at + i)
}

/// Appends a `stdout`/`stderr` event for a chunk, its id the chunk's sequence number.
pub fn push_chunk(out: &mut Vec<u8>, chunk: &Chunk) {
    push_event(
        out,
        chunk.stream.name(),
        Some(chunk.seq),
        &normalize(&chunk.data),
    );
}

/// Appends a `stdout`/`stderr` event for a chunk in the opt-in JSON format (`?format=json`):
/// data `{"seq": N, "text": "..."}`, the text lossy-decoded with its CRs kept (SSE data
/// cannot carry a bare CR, JSON escapes it).
pub fn push_chunk_json(out: &mut Vec<u8>, chunk: &Chunk) {
    let data = serde_json::json!({
        "seq": chunk.seq,
        "text": String::from_utf8_lossy(&chunk.data),
    });
    push_event(out, chunk.stream.name(), Some(chunk.seq), &data.to_string());
}

/// Appends a keepalive comment.
pub fn push_keepalive(out: &mut Vec<u8>) {
    out.extend_from_slice(b": keepalive\n\n");
}

/// The lines that open the `done` event; its JSON data and "\n\n" follow.
pub fn done_prefix(id: u64) -> Vec<u8> {
    format!("event: done\nid: {id}\ndata: ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_ends_are_found_wherever_they_are() {
        for len in 0..80 {
            for nl in 0..len {
                let mut bytes = vec![b'x'; len];
                bytes[nl] = b'\n';
                if nl + 3 < len {
                    bytes[nl + 3] = b'\n';
                }
                for from in 0..=len {
                    let expected = bytes[from.min(len)..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .map(|i| from + i);
                    assert_eq!(
                        next_line_end(&bytes, from),
                        expected,
                        "len {len} nl {nl} from {from}"
                    );
                }
            }
        }
        // Bytes that are one bit or one borrow away from a line feed are not one.
        let near = [0x0b, 0x09, 0x8a, 0x0e, 0x00, 0x01, 0xff];
        assert_eq!(next_line_end(&near.repeat(10), 0), None);
    }

    #[test]
    fn multi_line_data() {
        let mut out = Vec::new();
        push_event(&mut out, "stdout", Some(7), "a\nb\n");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "event: stdout\nid: 7\ndata: a\ndata: b\ndata: \n\n"
        );
    }

    #[test]
    fn event_without_id() {
        let mut out = Vec::new();
        push_event(&mut out, "truncated", None, "{\"stream\":\"stdout\"}");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "event: truncated\ndata: {\"stream\":\"stdout\"}\n\n"
        );
    }
}
