//! What the runbook list shows of each runbook without running anything: its description (the
//! text between the name and the first section) and its format problems (what validation
//! would report about the file itself; nothing about the server's environment or input files).
#![forbid(unsafe_code)]

use crate::params;
use crate::runbook::{self, Runbook};
use crate::validation::REQUIRED_SECTIONS;

/// Most characters of a description.
const DESCRIPTION_MAX_CHARS: usize = 300;

/// The first paragraph after the name line, up to the first H1 heading, whitespace folded.
pub fn description(markdown: &str) -> String {
    let mut words = Vec::new();
    for line in markdown.lines().skip(1) {
        if runbook::h1_title(line).is_some() {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            if words.is_empty() {
                continue;
            }
            break;
        }
        words.extend(line.split_whitespace());
    }
    let text = words.join(" ");
    match text.char_indices().nth(DESCRIPTION_MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// Problems of the file's format: missing sections, unreadable blocks, forbidden declarations,
/// no script, no name. A variable missing on the server or a missing input is not one.
pub fn format_problems(book: &Runbook) -> Vec<String> {
    let mut problems = Vec::new();
    for section in REQUIRED_SECTIONS {
        if !book.has_section(section) {
            problems.push(format!("missing required section: # {section}"));
        }
    }
    problems.extend(book.problems.iter().cloned());
    problems.extend(params::declaration_errors(book));
    if book.script.as_deref().is_none_or(|s| s.trim().is_empty()) {
        problems.push("no script block under # Script".to_string());
    }
    if book.name.is_none() {
        problems.push("the first line must be the runbook's name as an H1 (# Name)".to_string());
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_is_the_first_paragraph_before_a_section() {
        assert_eq!(
            description("# Deploy\n\nShips the\n  package.\n\nMore.\n# Script\n"),
            "Ships the package."
        );
        assert_eq!(description("# Deploy\n# Script\nx\n"), "");
        let long = format!("# A\n{}\n", "x".repeat(400));
        assert_eq!(
            description(&long).chars().count(),
            DESCRIPTION_MAX_CHARS + 1
        );
    }

    #[test]
    fn missing_variables_are_not_format_problems() {
        let good = "# A\n# Environment Requirements\n```yaml\nTARGET: where\n```\n# File System Requirements\n```yaml\nInput:\n- ./missing\n```\n# Script\n```sh\necho\n```\n# History\n";
        assert!(format_problems(&runbook::parse(good)).is_empty());
        let bad =
            "# A\n# Environment Requirements\n```yaml\nBASH_ENV: x\n```\n# Script\n```sh\n```\n";
        let problems = format_problems(&runbook::parse(bad));
        assert!(
            problems.iter().any(|p| p.contains("# History")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("BASH_ENV")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("no script")),
            "{problems:?}"
        );
    }
}
