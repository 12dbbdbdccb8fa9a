//! The markdown outline runbookd reads, shared by the runbook parser (`runbook`) and History
//! (`history`): H1 sections with byte offsets, fenced code blocks (``` or ~~~, up to three
//! spaces of indentation, closed by at least as many of the same marker) with the section
//! they lie in, and a block left open at the end. Headings inside code blocks do not count.
#![forbid(unsafe_code)]

/// One line of the document, without its LF or CRLF ending.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// Byte offset where the line starts.
    pub start: usize,
    pub text: &'a [u8],
}

/// An H1 section: its heading line up to the next H1 heading or the end of the document.
#[derive(Debug)]
pub struct Section<'a> {
    /// What follows the `#` of the heading, untrimmed.
    pub title: &'a [u8],
    /// Byte offset where the section ends: the start of the next H1 line, or the end.
    pub end: usize,
    /// The section's lines outside code blocks, fences excluded, heading excluded.
    pub prose: Vec<Line<'a>>,
}

/// A fenced code block.
#[derive(Debug)]
pub struct CodeBlock<'a> {
    /// Index into `Outline::sections` of the section it lies in; `None` before the first.
    pub section: Option<usize>,
    /// The info string after the opening fence (untrimmed; its first word is the language).
    pub info: &'a [u8],
    /// The lines between the fences.
    pub body: Vec<&'a [u8]>,
}

/// The document's first-line heading, sections and code blocks, found in one pass.
#[derive(Debug)]
pub struct Outline<'a> {
    /// What follows the `#` of an H1 on the first line (the runbook's name), untrimmed.
    pub name: Option<&'a [u8]>,
    /// The H1 sections after the first line, in order.
    pub sections: Vec<Section<'a>>,
    pub blocks: Vec<CodeBlock<'a>>,
    /// The 1-based line of a code block still open at the end of the document, if any.
    pub unclosed_fence_line: Option<usize>,
}

/// A code fence: the fence character and how many of them opened the block.
#[derive(Debug, Clone, Copy)]
struct Fence {
    marker: u8,
    width: usize,
}

/// Up to three spaces of indentation, as markdown allows before a fence.
fn fence_indent(line: &[u8]) -> Option<usize> {
    let indent = line.iter().take_while(|&&b| b == b' ').count();
    (indent <= 3).then_some(indent)
}

/// An opening fence (three or more backticks or tildes; no backtick in a backtick info
/// string) and its info string.
fn opening_fence(line: &[u8]) -> Option<(Fence, &[u8])> {
    let rest = &line[fence_indent(line)?..];
    let marker = *rest.first()?;
    if marker != b'`' && marker != b'~' {
        return None;
    }
    let width = rest.iter().take_while(|&&b| b == marker).count();
    let info = &rest[width..];
    if width < 3 || (marker == b'`' && info.contains(&b'`')) {
        return None;
    }
    Some((Fence { marker, width }, info))
}

/// Whether `line` closes a block opened by `fence`.
fn closes(fence: Fence, line: &[u8]) -> bool {
    let Some(indent) = fence_indent(line) else {
        return false;
    };
    let rest = &line[indent..];
    let width = rest.iter().take_while(|&&b| b == fence.marker).count();
    width >= fence.width && rest[width..].iter().all(|&b| b == b' ' || b == b'\t')
}

/// What follows the `#` of an H1 line (`#` then a space, a tab or nothing), untrimmed.
pub fn h1_rest(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"#")?;
    (rest.is_empty() || rest[0] == b' ' || rest[0] == b'\t').then_some(rest)
}

impl<'a> Outline<'a> {
    /// Reads `content`: lines end with LF, an optional CR before it removed.
    pub fn of(content: &'a [u8]) -> Outline<'a> {
        let mut outline = Outline {
            name: None,
            sections: Vec::new(),
            blocks: Vec::new(),
            unclosed_fence_line: None,
        };
        let mut open: Option<Fence> = None;
        let mut line_start = 0;
        for (index, raw_line) in content.split_inclusive(|&b| b == b'\n').enumerate() {
            let start = line_start;
            line_start += raw_line.len();
            let text = raw_line.strip_suffix(b"\n").unwrap_or(raw_line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if let Some(fence) = open {
                if closes(fence, text) {
                    open = None;
                    outline.unclosed_fence_line = None;
                } else if let Some(block) = outline.blocks.last_mut() {
                    block.body.push(text);
                }
                continue;
            }
            if let Some((fence, info)) = opening_fence(text) {
                outline.blocks.push(CodeBlock {
                    section: outline.sections.len().checked_sub(1),
                    info,
                    body: Vec::new(),
                });
                open = Some(fence);
                outline.unclosed_fence_line = Some(index + 1);
                continue;
            }
            if let Some(title) = h1_rest(text) {
                if index == 0 {
                    outline.name = Some(title);
                } else {
                    if let Some(previous) = outline.sections.last_mut() {
                        previous.end = start;
                    }
                    outline.sections.push(Section {
                        title,
                        end: content.len(),
                        prose: Vec::new(),
                    });
                }
                continue;
            }
            if let Some(section) = outline.sections.last_mut() {
                section.prose.push(Line { start, text });
            }
        }
        outline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_blocks_and_offsets() {
        let doc = b"# Name\r\n# A\ntext\n```sh x\n# not a heading\n```\n#B\n#\tB\n~~~\nopen";
        let outline = Outline::of(doc);
        assert_eq!(outline.name, Some(&b" Name"[..]));
        let titles: Vec<&[u8]> = outline.sections.iter().map(|s| s.title).collect();
        assert_eq!(titles, vec![&b" A"[..], b"\tB"]);
        assert_eq!(outline.sections[0].prose[0].start, 12);
        assert_eq!(outline.sections[0].end, 48);
        assert_eq!(outline.sections[1].end, doc.len());
        let prose: Vec<&[u8]> = outline.sections[0].prose.iter().map(|l| l.text).collect();
        assert_eq!(prose, vec![&b"text"[..], b"#B"]);
        assert_eq!(outline.blocks.len(), 2);
        assert_eq!(outline.blocks[0].info, b"sh x");
        assert_eq!(outline.blocks[0].body, vec![&b"# not a heading"[..]]);
        assert_eq!(outline.blocks[0].section, Some(0));
        assert_eq!(outline.blocks[1].section, Some(1));
        assert_eq!(outline.unclosed_fence_line, Some(9));
    }

    #[test]
    fn fences_close_with_the_same_marker_and_width() {
        let outline = Outline::of(b"# N\n````\n```\n~~~~\n    ````\n ````  \n# S\n");
        assert_eq!(outline.blocks[0].body.len(), 3);
        assert_eq!(outline.unclosed_fence_line, None);
        assert_eq!(outline.sections.len(), 1);
        assert!(Outline::of(b"``` a`b\n# S\n").blocks.is_empty());
    }
}
