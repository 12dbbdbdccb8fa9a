//! Safe access to the runbooks directory: listing runbooks and resolving names and input paths
//! so that nothing outside the directory is ever read. A runbook is read as a file a script may
//! have replaced: never through a symbolic link, never blocking, at most `RUNBOOK_MAX_BYTES`,
//! under the shared sidecar lock so that a History write is never seen half done.
#![forbid(unsafe_code)]

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::runbook;
use crate::runbook_file::{self, FileError};

/// Default of `RUNBOOK_MAX_BYTES`.
pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// The runbooks directory.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Canonical path of the directory.
    root: PathBuf,
    /// `RUNBOOK_MAX_BYTES`: larger runbooks are refused.
    max_bytes: u64,
}

/// One runbook in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    pub filename: String,
    /// Text of the H1 on the first line, trimmed.
    pub name: String,
    /// Path relative to the runbooks directory (the file name, as runbooks are not nested).
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// The name cannot be a runbook file name (separator, `..`, control character, not `.md`).
    #[error("invalid runbook file name")]
    InvalidName,
    /// No such runbook: missing, not a regular file (a FIFO, a device), or a symbolic link
    /// (links are never followed, so where one leads is never revealed).
    #[error("runbook not found")]
    NotFound,
    /// Larger than `RUNBOOK_MAX_BYTES`.
    #[error("the runbook is larger than RUNBOOK_MAX_BYTES ({max} bytes)")]
    TooLarge { max: u64 },
    #[error("cannot read the runbooks directory: {0}")]
    Io(#[source] io::Error),
}

/// How much of a file is read to find its first line when listing.
const FIRST_LINE_LIMIT: u64 = 8 * 1024;

const RUNBOOK_EXTENSION: &str = ".md";

impl Catalog {
    /// Opens the runbooks directory; it must exist and be a directory.
    pub fn open(root: &Path) -> Result<Catalog, CatalogError> {
        let root = fs::canonicalize(root).map_err(CatalogError::Io)?;
        let metadata = fs::metadata(&root).map_err(CatalogError::Io)?;
        if !metadata.is_dir() {
            return Err(CatalogError::Io(io::Error::new(
                io::ErrorKind::NotADirectory,
                "the runbooks directory is not a directory",
            )));
        }
        Ok(Catalog {
            root,
            max_bytes: DEFAULT_MAX_BYTES,
        })
    }

    /// The same directory with `RUNBOOK_MAX_BYTES` set to `max_bytes`.
    pub fn with_max_bytes(self, max_bytes: u64) -> Catalog {
        Catalog { max_bytes, ..self }
    }

    /// The canonical path of the runbooks directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Files directly in root ending `.md` whose first line is an H1 (`# `), sorted by filename.
    /// Files that [`Catalog::resolve`] refuses (hidden files, symlinks, FIFOs, ...) are left out,
    /// as are unreadable ones; one over `RUNBOOK_MAX_BYTES` is listed (reading it is refused).
    pub fn list(&self) -> Result<Vec<CatalogEntry>, CatalogError> {
        let mut entries = Vec::new();
        for dir_entry in fs::read_dir(&self.root).map_err(CatalogError::Io)? {
            let dir_entry = match dir_entry {
                Ok(dir_entry) => dir_entry,
                Err(error) => {
                    log::warn!("skipping an unreadable entry of the runbooks directory: {error}");
                    continue;
                }
            };
            let Ok(filename) = dir_entry.file_name().into_string() else {
                continue;
            };
            let Ok(path) = self.resolve(&filename) else {
                continue;
            };
            match first_line_title(&path) {
                Ok(Some(name)) => entries.push(CatalogEntry {
                    path: filename.clone(),
                    filename,
                    name,
                }),
                Ok(None) => {}
                Err(error) => log::warn!("skipping an unreadable runbook: {error}"),
            }
        }
        entries.sort_by(|a, b| a.filename.cmp(&b.filename));
        Ok(entries)
    }

    /// Resolve an already percent-decoded file name to a path inside root.
    /// InvalidName: empty, starts with '.', contains '/', '\\', NUL, is "." or "..", contains
    /// "..", does not end with ".md", or contains control characters.
    /// NotFound: no such regular file; a symbolic link is never followed, wherever it leads
    /// (a script could otherwise point its runbook at `/dev/zero` or outside the directory).
    pub fn resolve(&self, file: &str) -> Result<PathBuf, CatalogError> {
        if !is_valid_file_name(file) {
            return Err(CatalogError::InvalidName);
        }
        let candidate = self.root.join(file);
        let metadata = fs::symlink_metadata(&candidate).map_err(absent_as_not_found)?;
        if !metadata.is_file() {
            return Err(CatalogError::NotFound);
        }
        Ok(candidate)
    }

    /// resolve + read to string (NotFound / TooLarge / Io); non-UTF-8 content is decoded
    /// lossily. The read happens under the shared sidecar lock, so a History write in progress
    /// is never seen half done.
    pub fn read(&self, file: &str) -> Result<(PathBuf, String), CatalogError> {
        let path = self.resolve(file)?;
        let lock = runbook_file::lock(&path, false, runbook_file::READ_LOCK_WAIT);
        // Only a writer can tear a read, and no writer gets past this sidecar either (a
        // read-only directory, where no sidecar can be made, has no History writers at all).
        match &lock {
            Err(error @ FileError::Busy) => log::warn!("reading {file} without its lock: {error}"),
            Err(error) => log::debug!("reading {file} without its lock: {error}"),
            Ok(_) => {}
        }
        let (file, opened) =
            runbook_file::open(&path, false, self.max_bytes).map_err(file_error)?;
        let bytes =
            runbook_file::read_bounded(&file, &opened, self.max_bytes).map_err(file_error)?;
        drop(lock);
        Ok((path, runbook_text(bytes)))
    }

    /// For `Input:` entries: resolve a path relative to the runbook's directory (root) and
    /// refuse anything whose canonical path is outside root. Returns the canonical path, or None
    /// if missing/outside. Root itself counts as inside.
    pub fn resolve_input(&self, input: &str) -> Option<PathBuf> {
        if input.trim().is_empty() || input.contains('\0') {
            return None;
        }
        let canonical = fs::canonicalize(self.root.join(input)).ok()?;
        canonical.starts_with(&self.root).then_some(canonical)
    }
}

/// A runbook file's bytes as text (invalid UTF-8 replaced), as [`Catalog::read`] gives it.
pub fn runbook_text(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => String::from_utf8_lossy(error.as_bytes()).into_owned(),
    }
}

/// Most runbook names suggested for a name that matches none.
const MAX_SUGGESTIONS: usize = 3;
/// Longest name (in characters) compared with the runbook names or echoed whole.
const MAX_COMPARED_NAME: usize = 200;

impl Catalog {
    /// What to tell a caller who asked for `file` and got `error` (`NotFound` or
    /// `InvalidName`): the name asked for and, with `suggest`, the nearest listed runbook
    /// names (same name in another case or without `.md`, a small edit distance, or one
    /// containing the other). Suggestions come from [`Catalog::list`] only, so they reveal
    /// nothing a listing would not.
    pub fn explain(&self, file: &str, error: &CatalogError, suggest: bool) -> String {
        let nearest = if suggest {
            self.nearest(file)
        } else {
            Vec::new()
        };
        let did_you_mean = match nearest.as_slice() {
            [] => String::new(),
            [only] => format!("did you mean {only}?"),
            [init @ .., last] => format!("did you mean {} or {last}?", init.join(", ")),
        };
        match error {
            CatalogError::NotFound if did_you_mean.is_empty() => {
                format!("runbook {} not found", shown_name(file))
            }
            CatalogError::NotFound => {
                format!("runbook {} not found; {did_you_mean}", shown_name(file))
            }
            CatalogError::InvalidName
                if !file.ends_with(RUNBOOK_EXTENSION)
                    && is_valid_file_name(&format!("{file}{RUNBOOK_EXTENSION}")) =>
            {
                if did_you_mean.is_empty() {
                    format!("runbook names end in .md, as in {}.md", shown_name(file))
                } else {
                    format!("runbook names end in .md: {did_you_mean}")
                }
            }
            CatalogError::InvalidName => format!(
                "invalid runbook file name {}: a runbook is named by its file in the runbooks directory, ending in .md, without /, \\ or ..",
                shown_name(file)
            ),
            other => other.to_string(),
        }
    }

    /// The listed runbook names nearest to `file`, best first (at most [`MAX_SUGGESTIONS`]).
    fn nearest(&self, file: &str) -> Vec<String> {
        let wanted = stem_key(file);
        if wanted.is_empty() || wanted.chars().count() > MAX_COMPARED_NAME {
            return Vec::new();
        }
        let Ok(entries) = self.list() else {
            return Vec::new();
        };
        let wanted_len = wanted.chars().count();
        let allowed = (wanted_len / 3).clamp(1, 3);
        let mut scored: Vec<(usize, String)> = entries
            .into_iter()
            .filter_map(|entry| {
                let key = stem_key(&entry.filename);
                let distance = edit_distance(&wanted, &key);
                let contains = wanted_len >= 3 && (key.contains(&wanted) || wanted.contains(&key));
                if distance <= allowed {
                    Some((distance, entry.filename))
                } else if contains {
                    Some((allowed + 1, entry.filename))
                } else {
                    None
                }
            })
            .collect();
        scored.sort();
        scored
            .into_iter()
            .take(MAX_SUGGESTIONS)
            .map(|(_, name)| name)
            .collect()
    }
}

/// A name compared case-insensitively and without its `.md`.
fn stem_key(name: &str) -> String {
    let lower = name.to_lowercase();
    match lower.strip_suffix(RUNBOOK_EXTENSION) {
        Some(stem) => stem.to_string(),
        None => lower,
    }
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// A requested name as shown in an error: as it is, or quoted with escapes when it holds
/// control characters; cut after [`MAX_COMPARED_NAME`] characters.
fn shown_name(file: &str) -> String {
    let mut name: String = file.chars().take(MAX_COMPARED_NAME).collect();
    if name.len() < file.len() {
        name.push_str("...");
    }
    if name.chars().any(char::is_control) || name.is_empty() {
        format!("{name:?}")
    } else {
        name
    }
}

fn is_valid_file_name(file: &str) -> bool {
    !file.is_empty()
        && !file.starts_with('.')
        && !file.contains(['/', '\\', '\0'])
        && !file.contains("..")
        && file.ends_with(RUNBOOK_EXTENSION)
        && !file.chars().any(char::is_control)
}

/// Errors that mean "there is no such file" become NotFound; others stay I/O errors.
fn absent_as_not_found(error: io::Error) -> CatalogError {
    match error.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR | libc::ENAMETOOLONG | libc::ELOOP) => {
            CatalogError::NotFound
        }
        _ if error.kind() == io::ErrorKind::NotFound => CatalogError::NotFound,
        _ => CatalogError::Io(error),
    }
}

/// A runbook swapped since it was resolved (for a symlink, a FIFO, ...) reads as not found.
fn file_error(error: FileError) -> CatalogError {
    match error {
        FileError::Missing | FileError::Symlink | FileError::NotRegular(_) => {
            CatalogError::NotFound
        }
        FileError::TooLarge { max } => CatalogError::TooLarge { max },
        FileError::Busy => {
            CatalogError::Io(io::Error::new(io::ErrorKind::WouldBlock, error.to_string()))
        }
        FileError::Io(error) => CatalogError::Io(error),
    }
}

/// The title of the H1 on the first line of the file, or None if the first line is not an H1.
/// Reads at most [`FIRST_LINE_LIMIT`] bytes, so the size limit does not apply here.
fn first_line_title(path: &Path) -> Result<Option<String>, CatalogError> {
    let (file, _) = runbook_file::open(path, false, u64::MAX).map_err(file_error)?;
    let mut first_line = Vec::new();
    BufReader::new(file.take(FIRST_LINE_LIMIT))
        .read_until(b'\n', &mut first_line)
        .map_err(CatalogError::Io)?;
    let line = String::from_utf8_lossy(&first_line);
    let line = line.strip_prefix('\u{feff}').unwrap_or(&line);
    let line = line.strip_suffix('\n').unwrap_or(line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    Ok(runbook::h1_title(line).map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dirs::{mkfifo, TempDir};
    use std::os::unix::fs::symlink;

    fn not_found<T: std::fmt::Debug>(result: Result<T, CatalogError>) -> bool {
        matches!(result, Err(CatalogError::NotFound))
    }

    fn invalid<T: std::fmt::Debug>(result: Result<T, CatalogError>) -> bool {
        matches!(result, Err(CatalogError::InvalidName))
    }

    #[test]
    fn explains_a_missing_runbook_with_the_nearest_names() {
        let dir = TempDir::new("explain");
        for name in ["HelloWorld.md", "Ticker.md", "Deploy.md", "DeployAll.md"] {
            dir.write(name, b"# A\n");
        }
        dir.write("Hidden.txt", b"# A\n");
        let catalog = Catalog::open(dir.path()).unwrap();
        let not_found = |file: &str| catalog.explain(file, &CatalogError::NotFound, true);
        assert_eq!(
            not_found("Helloworld.md"),
            "runbook Helloworld.md not found; did you mean HelloWorld.md?"
        );
        assert_eq!(
            not_found("Tikcer.md"),
            "runbook Tikcer.md not found; did you mean Ticker.md?"
        );
        assert_eq!(
            not_found("deploy.md"),
            "runbook deploy.md not found; did you mean Deploy.md or DeployAll.md?"
        );
        assert_eq!(not_found("Nothing.md"), "runbook Nothing.md not found");
        assert_eq!(not_found("Hidden.md"), "runbook Hidden.md not found");
        assert_eq!(
            catalog.explain("Helloworld.md", &CatalogError::NotFound, false),
            "runbook Helloworld.md not found"
        );
        let invalid = |file: &str| catalog.explain(file, &CatalogError::InvalidName, true);
        assert_eq!(
            invalid("HelloWorld"),
            "runbook names end in .md: did you mean HelloWorld.md?"
        );
        assert_eq!(invalid("Other"), "runbook names end in .md, as in Other.md");
        assert!(invalid("../x.md").starts_with("invalid runbook file name ../x.md: "));
        assert!(invalid("a\u{1b}b").starts_with("invalid runbook file name \"a\\u{1b}b\": "));
        let long = "x".repeat(5000);
        assert!(not_found(&long).len() < 300);
    }

    #[test]
    fn open_requires_an_existing_directory() {
        let dir = TempDir::new("open");
        let file = dir.write("plain.md", b"# x\n");
        assert!(matches!(Catalog::open(&file), Err(CatalogError::Io(_))));
        assert!(matches!(
            Catalog::open(&dir.path().join("missing")),
            Err(CatalogError::Io(_))
        ));
        let catalog = Catalog::open(&dir.path().join(".")).unwrap();
        assert_eq!(catalog.root(), fs::canonicalize(dir.path()).unwrap());
    }

    #[test]
    fn lists_runbooks_sorted_and_skips_others() {
        let dir = TempDir::new("list");
        let outside = TempDir::new("list-outside");
        dir.write("zeta.md", b"# Zeta\nbody\n");
        dir.write("alpha.md", b"#   Alpha  \r\n");
        dir.write("bom.md", "\u{feff}# Bom".as_bytes());
        dir.write("prose.md", b"Not a heading\n# Later\n");
        dir.write("h2.md", b"## Sub\n");
        dir.write("nospace.md", b"#Tight\n");
        dir.write("empty.md", b"");
        dir.write("notes.txt", b"# Text\n");
        dir.write("UPPER.MD", b"# Upper\n");
        dir.write("latin1.md", b"# Caf\xe9\n");
        dir.write(".hidden.md", b"# Hidden\n");
        dir.write(".zeta.md.lock", b"");
        fs::create_dir(dir.path().join("folder.md")).unwrap();
        symlink(dir.path().join("zeta.md"), dir.path().join("link.md")).unwrap();
        let secret = outside.write("secret.md", b"# Secret\n");
        symlink(&secret, dir.path().join("escape.md")).unwrap();
        symlink(dir.path().join("gone.md"), dir.path().join("dangling.md")).unwrap();

        let catalog = Catalog::open(dir.path()).unwrap();
        let listed: Vec<(String, String, String)> = catalog
            .list()
            .unwrap()
            .into_iter()
            .map(|entry| (entry.filename, entry.name, entry.path))
            .collect();
        let expected = [
            ("alpha.md", "Alpha"),
            ("bom.md", "Bom"),
            ("latin1.md", "Caf\u{fffd}"),
            ("zeta.md", "Zeta"),
        ];
        let expected: Vec<(String, String, String)> = expected
            .iter()
            .map(|(file, name)| (file.to_string(), name.to_string(), file.to_string()))
            .collect();
        assert_eq!(listed, expected);
    }

    #[test]
    fn traversal_and_malformed_names_are_invalid() {
        let dir = TempDir::new("names");
        let catalog = Catalog::open(dir.path()).unwrap();
        for name in [
            "",
            ".",
            "..",
            "../x.md",
            "..md",
            "a..b.md",
            "sub/x.md",
            "/etc/passwd.md",
            "a\\b.md",
            "x\0.md",
            "line\nbreak.md",
            "tab\t.md",
            "readme.txt",
            "readme.MD",
            "readme.md.bak",
        ] {
            assert!(invalid(catalog.resolve(name)), "{name:?}");
            assert!(invalid(catalog.read(name)), "{name:?}");
        }
        // Percent-encoding is decoded by the caller; here it is just an odd, missing name.
        assert!(not_found(catalog.resolve("%2e%2e%2fx.md")));
        assert!(not_found(
            catalog.resolve(&format!("{}.md", "a".repeat(300)))
        ));
    }

    #[test]
    fn resolves_and_reads_regular_files() {
        let dir = TempDir::new("read");
        dir.write("ok.md", b"# Ok\nline\n");
        dir.write("bytes.md", b"# B\n\xff\xfe end\n");
        fs::create_dir(dir.path().join("folder.md")).unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();

        let (path, text) = catalog.read("ok.md").unwrap();
        assert_eq!(path, catalog.root().join("ok.md"));
        assert_eq!(text, "# Ok\nline\n");
        let (_, text) = catalog.read("bytes.md").unwrap();
        assert_eq!(text, "# B\n\u{fffd}\u{fffd} end\n");
        assert!(not_found(catalog.resolve("missing.md")));
        assert!(not_found(catalog.read("missing.md")));
        assert!(not_found(catalog.resolve("folder.md")));
    }

    #[test]
    fn fifo_is_not_a_runbook() {
        let dir = TempDir::new("fifo");
        mkfifo(&dir.path().join("pipe.md"));
        let catalog = Catalog::open(dir.path()).unwrap();
        assert!(not_found(catalog.resolve("pipe.md")));
        assert!(catalog.list().unwrap().is_empty());
    }

    #[test]
    fn symlink_outside_is_refused_like_a_missing_file() {
        let dir = TempDir::new("symlink-out");
        let outside = TempDir::new("symlink-out-target");
        let secret = outside.write("secret.md", b"# Secret\n");
        symlink(&secret, dir.path().join("evil.md")).unwrap();
        symlink(
            outside.path().join("missing.md"),
            dir.path().join("dangling.md"),
        )
        .unwrap();
        symlink(outside.path(), dir.path().join("outdir.md")).unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();

        assert!(not_found(catalog.resolve("evil.md")));
        assert!(not_found(catalog.read("evil.md")));
        assert!(not_found(catalog.resolve("dangling.md")));
        assert!(not_found(catalog.resolve("outdir.md")));
        assert!(catalog.list().unwrap().is_empty());
    }

    #[test]
    fn symlinks_are_never_followed() {
        let dir = TempDir::new("symlink-in");
        fs::create_dir(dir.path().join("drafts")).unwrap();
        let target = dir.write("drafts/real.md", b"# Real\n");
        symlink(&target, dir.path().join("alias.md")).unwrap();
        symlink("drafts", dir.path().join("dir.md")).unwrap();
        symlink("/dev/zero", dir.path().join("zero.md")).unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();

        for name in ["alias.md", "dir.md", "zero.md"] {
            assert!(not_found(catalog.resolve(name)), "{name}");
            assert!(not_found(catalog.read(name)), "{name}");
        }
        assert!(catalog.list().unwrap().is_empty());
    }

    #[test]
    fn hidden_files_are_not_runbooks() {
        let dir = TempDir::new("hidden");
        dir.write(".R.md", b"# R\n");
        let catalog = Catalog::open(dir.path()).unwrap();
        assert!(invalid(catalog.read(".R.md")));
        assert!(catalog.list().unwrap().is_empty());
    }

    #[test]
    fn runbooks_over_the_limit_are_listed_but_not_read() {
        let dir = TempDir::new("too-large");
        dir.write("big.md", b"# Big\n0123456789\n");
        dir.write("small.md", b"# Small\n");
        let catalog = Catalog::open(dir.path()).unwrap().with_max_bytes(10);
        assert!(matches!(
            catalog.read("big.md"),
            Err(CatalogError::TooLarge { max: 10 })
        ));
        assert_eq!(catalog.read("small.md").unwrap().1, "# Small\n");
        let names: Vec<String> = catalog
            .list()
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, vec!["Big", "Small"]);
    }

    #[test]
    fn inputs_must_stay_inside_the_directory() {
        let parent = TempDir::new("inputs");
        let root = parent.path().join("runbooks");
        fs::create_dir_all(root.join("CreatePackage")).unwrap();
        fs::write(root.join("config.json"), b"{}").unwrap();
        fs::write(parent.path().join("outside.txt"), b"secret").unwrap();
        symlink(parent.path().join("outside.txt"), root.join("sneaky")).unwrap();
        symlink(root.join("config.json"), root.join("friendly")).unwrap();
        let catalog = Catalog::open(&root).unwrap();
        let canonical_root = catalog.root().to_path_buf();

        assert_eq!(
            catalog.resolve_input("./CreatePackage"),
            Some(canonical_root.join("CreatePackage"))
        );
        assert_eq!(
            catalog.resolve_input("config.json"),
            Some(canonical_root.join("config.json"))
        );
        assert_eq!(
            catalog.resolve_input("friendly"),
            Some(canonical_root.join("config.json"))
        );
        let absolute_inside = canonical_root.join("config.json");
        assert_eq!(
            catalog.resolve_input(absolute_inside.to_str().unwrap()),
            Some(absolute_inside.clone())
        );
        assert_eq!(
            catalog.resolve_input("./CreatePackage/../config.json"),
            Some(absolute_inside)
        );
        assert_eq!(catalog.resolve_input("../outside.txt"), None);
        assert_eq!(catalog.resolve_input("sneaky"), None);
        assert_eq!(
            catalog.resolve_input(parent.path().join("outside.txt").to_str().unwrap()),
            None
        );
        assert_eq!(catalog.resolve_input("/etc/passwd"), None);
        assert_eq!(catalog.resolve_input("missing"), None);
        assert_eq!(catalog.resolve_input(""), None);
        assert_eq!(catalog.resolve_input("a\0b"), None);
    }
}
