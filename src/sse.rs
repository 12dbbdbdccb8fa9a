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
    for end in memchr::memchr_iter(b'\n', bytes) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&bytes[start..=end]);
        start = end + 1;
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&bytes[start..]);
    out.extend_from_slice(b"\n\n");
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
