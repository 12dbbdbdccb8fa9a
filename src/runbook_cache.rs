//! Parsed runbooks kept by their exact text, so that an execute whose runbook has not changed
//! since it was last parsed skips the parse (its YAML blocks and outline cost tens of
//! microseconds on a run's path). The file is still read on every execute: a hit needs the very
//! same bytes, so a runbook edited in any way, however quickly, is parsed again. A run's own
//! History entry changes the file, so the run that wrote it parses the new text for the next one
//! once its result is out (`warm`).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::runbook::{self, Runbook};

/// Most runbooks kept; past it the cache starts again empty.
const MAX_ENTRIES: usize = 256;

/// A runbook's text and what it parsed to.
struct Parsed {
    text: String,
    book: Arc<Runbook>,
}

/// Parsed runbooks by path.
#[derive(Default)]
pub struct RunbookCache {
    entries: Mutex<HashMap<PathBuf, Parsed>>,
}

impl RunbookCache {
    fn entries(&self) -> MutexGuard<'_, HashMap<PathBuf, Parsed>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `text` (the runbook at `path`) parsed: kept from before when it is the same text.
    pub fn parse(&self, path: &Path, text: String) -> Arc<Runbook> {
        if let Some(parsed) = self.entries().get(path) {
            if parsed.text == text {
                return parsed.book.clone();
            }
        }
        let book = Arc::new(runbook::parse(&text));
        self.keep(path, text, book.clone());
        book
    }

    /// Parses `text`, the runbook at `path` as just written, for the next execute.
    pub fn warm(&self, path: &Path, text: String) {
        if self
            .entries()
            .get(path)
            .is_some_and(|parsed| parsed.text == text)
        {
            return;
        }
        let book = Arc::new(runbook::parse(&text));
        self.keep(path, text, book);
    }

    fn keep(&self, path: &Path, text: String, book: Arc<Runbook>) {
        let mut entries = self.entries();
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(path) {
            entries.clear();
        }
        entries.insert(path.to_path_buf(), Parsed { text, book });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOK: &str = "# Deploy\n# Script\n```sh\necho one\n```\n# History\n";

    #[test]
    fn the_same_text_gets_the_same_parse_and_any_change_a_new_one() {
        let cache = RunbookCache::default();
        let path = Path::new("/books/Deploy.md");
        let first = cache.parse(path, BOOK.to_string());
        assert_eq!(first.script.as_deref(), Some("echo one\n"));
        let again = cache.parse(path, BOOK.to_string());
        assert!(
            Arc::ptr_eq(&first, &again),
            "the same text is not parsed again"
        );

        // One byte changed, same length: parsed again.
        let edited = BOOK.replace("one", "two");
        assert_eq!(edited.len(), BOOK.len());
        let changed = cache.parse(path, edited);
        assert!(!Arc::ptr_eq(&first, &changed));
        assert_eq!(changed.script.as_deref(), Some("echo two\n"));
    }

    #[test]
    fn another_path_with_the_same_text_is_its_own_entry() {
        let cache = RunbookCache::default();
        let a = cache.parse(Path::new("/books/A.md"), BOOK.to_string());
        let b = cache.parse(Path::new("/books/B.md"), BOOK.to_string());
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(
            &a,
            &cache.parse(Path::new("/books/A.md"), BOOK.to_string())
        ));
    }

    #[test]
    fn a_warmed_text_is_a_hit_and_a_full_cache_starts_again() {
        let cache = RunbookCache::default();
        let path = Path::new("/books/Deploy.md");
        let with_entry = format!("{BOOK}\n### 2026-12-04T00:00:00.000Z | Exit Code: 0\n");
        cache.warm(path, with_entry.clone());
        let warmed = cache.parse(path, with_entry.clone());
        assert!(Arc::ptr_eq(&warmed, &cache.parse(path, with_entry)));

        for i in 0..MAX_ENTRIES {
            cache.parse(&PathBuf::from(format!("/books/{i}.md")), BOOK.to_string());
        }
        assert!(cache.entries().len() <= MAX_ENTRIES);
    }
}
