//! The sample runbooks shipped inside the binary, and their one-time installation into a
//! directory (used when `RUNBOOKS_DIR` is not set).
#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Every file under `samples/` as (path relative to `samples/`, contents), listed explicitly.
/// A unit test checks that this list and the folder on disk agree.
pub const SAMPLE_FILES: &[(&str, &[u8])] = &[
    ("AdminOnly.md", include_bytes!("../samples/AdminOnly.md")),
    ("Child.md", include_bytes!("../samples/Child.md")),
    (
        "CreatePackage.md",
        include_bytes!("../samples/CreatePackage.md"),
    ),
    (
        "CreatePackage/README.txt",
        include_bytes!("../samples/CreatePackage/README.txt"),
    ),
    (
        "CreatePackage/manifest.txt",
        include_bytes!("../samples/CreatePackage/manifest.txt"),
    ),
    ("EnvDemo.md", include_bytes!("../samples/EnvDemo.md")),
    ("Fails.md", include_bytes!("../samples/Fails.md")),
    ("HelloWorld.md", include_bytes!("../samples/HelloWorld.md")),
    ("Parent.md", include_bytes!("../samples/Parent.md")),
    ("Ticker.md", include_bytes!("../samples/Ticker.md")),
];

/// Distinguishes staging folders of concurrent installs within one process.
static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Copies the samples into `dest` if `dest` does not exist yet, creating its parents.
/// An existing `dest` is never touched, whatever it holds.
///
/// The files are written into a staging folder beside `dest` that is then renamed, so an
/// interrupted install never leaves a half-filled `dest` behind.
/// Returns `Ok(true)` if the samples were installed by this call.
pub fn install(dest: &Path) -> io::Result<bool> {
    if path_is_present(dest)? {
        return Ok(false);
    }
    let parent = match dest.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent)?;
    let staging = staging_path(&parent, dest);
    if let Err(error) = write_samples(&staging) {
        // Best-effort cleanup: the original error is the one worth reporting.
        let _ = fs::remove_dir_all(&staging);
        return Err(error);
    }
    match fs::rename(&staging, dest) {
        Ok(()) => Ok(true),
        Err(error) => {
            let _ = fs::remove_dir_all(&staging);
            // Someone else created `dest` meanwhile: theirs is kept, as for an existing one.
            if path_is_present(dest)? {
                Ok(false)
            } else {
                Err(error)
            }
        }
    }
}

/// True if something (even a dangling symlink) exists at `path`.
fn path_is_present(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// A fresh hidden folder name next to `dest`, unique per process and call.
fn staging_path(parent: &Path, dest: &Path) -> PathBuf {
    let base = dest
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| String::from("samples"));
    let sequence = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
    parent.join(format!(
        ".{base}.installing-{}-{sequence}",
        std::process::id()
    ))
}

/// Writes every sample file under `root`, which must not exist yet.
fn write_samples(root: &Path) -> io::Result<()> {
    fs::create_dir(root)?;
    for (relative, contents) in SAMPLE_FILES {
        let target = root.join(checked_relative_path(relative)?);
        if let Some(folder) = target.parent() {
            fs::create_dir_all(folder)?;
        }
        fs::write(&target, contents)?;
    }
    Ok(())
}

/// Refuses a sample path that could leave the destination folder.
fn checked_relative_path(relative: &str) -> io::Result<&Path> {
    let path = Path::new(relative);
    let plain = path
        .components()
        .all(|component| matches!(component, Component::Normal(_)));
    if plain && !relative.is_empty() {
        Ok(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("sample path {relative:?} is not a plain relative path"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dirs::fresh_dir;
    use std::collections::BTreeSet;

    fn samples_dir_on_disk() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("samples")
    }

    fn files_under(root: &Path) -> BTreeSet<String> {
        fn walk(root: &Path, folder: &Path, found: &mut BTreeSet<String>) {
            for entry in fs::read_dir(folder).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(root, &path, found);
                } else {
                    let relative = path.strip_prefix(root).unwrap();
                    let parts: Vec<String> = relative
                        .components()
                        .map(|part| part.as_os_str().to_string_lossy().into_owned())
                        .collect();
                    found.insert(parts.join("/"));
                }
            }
        }
        let mut found = BTreeSet::new();
        walk(root, root, &mut found);
        found
    }

    #[test]
    fn embedded_list_matches_the_samples_folder() {
        let on_disk = files_under(&samples_dir_on_disk());
        let embedded: BTreeSet<String> = SAMPLE_FILES
            .iter()
            .map(|(path, _)| path.to_string())
            .collect();
        assert_eq!(
            embedded.len(),
            SAMPLE_FILES.len(),
            "duplicate entries in SAMPLE_FILES"
        );
        assert_eq!(on_disk, embedded);
        for (relative, contents) in SAMPLE_FILES {
            let disk = fs::read(samples_dir_on_disk().join(relative)).unwrap();
            assert_eq!(
                &disk[..],
                *contents,
                "{relative} differs from the file on disk"
            );
        }
    }

    #[test]
    fn every_sample_runbook_starts_with_its_name_as_h1() {
        let mut runbooks = 0;
        for (relative, contents) in SAMPLE_FILES {
            let path = Path::new(relative);
            if path.extension().and_then(|ext| ext.to_str()) != Some("md") {
                continue;
            }
            // Only top-level .md files are runbooks.
            assert_eq!(path.components().count(), 1, "{relative} is nested");
            runbooks += 1;
            let text = std::str::from_utf8(contents).unwrap();
            let first_line = text.lines().next().unwrap_or_default();
            let stem = path.file_stem().unwrap().to_str().unwrap();
            assert_eq!(first_line, format!("# {stem}"), "first line of {relative}");
            for section in [
                "\n# Environment Requirements\n",
                "\n# File System Requirements\n",
                "\n# Script\n",
            ] {
                assert!(text.contains(section), "{relative} lacks {section:?}");
            }
            assert!(
                text.trim_end().ends_with("# History"),
                "{relative} must end with an empty History section"
            );
        }
        assert!(runbooks >= 2, "expected several sample runbooks");
    }

    #[test]
    fn install_creates_the_files_once_and_never_overwrites() {
        let temp = fresh_dir("samples-install");
        let dest = temp.join("state").join("samples");

        assert!(install(&dest).unwrap());
        for (relative, contents) in SAMPLE_FILES {
            assert_eq!(&fs::read(dest.join(relative)).unwrap()[..], *contents);
        }
        assert_eq!(
            files_under(&dest),
            SAMPLE_FILES.iter().map(|(p, _)| p.to_string()).collect()
        );
        // No staging folder is left beside the destination.
        let leftovers: Vec<_> = fs::read_dir(dest.parent().unwrap())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("samples")]);

        let (first, _) = SAMPLE_FILES[0];
        let edited = dest.join(first);
        fs::write(&edited, b"# edited by the user\n").unwrap();
        let removed = dest.join(SAMPLE_FILES[1].0);
        fs::remove_file(&removed).unwrap();

        assert!(!install(&dest).unwrap());
        assert_eq!(fs::read(&edited).unwrap(), b"# edited by the user\n");
        assert!(!removed.exists(), "a second install must not refill dest");

        fs::remove_dir_all(&temp).unwrap();
    }

    #[test]
    fn install_leaves_an_existing_file_at_dest_alone() {
        let temp = fresh_dir("samples-file");
        let dest = temp.join("samples");
        fs::write(&dest, b"not a folder").unwrap();
        assert!(!install(&dest).unwrap());
        assert_eq!(fs::read(&dest).unwrap(), b"not a folder");
        fs::remove_dir_all(&temp).unwrap();
    }

    #[test]
    fn sample_paths_are_plain_relative_paths() {
        for (relative, _) in SAMPLE_FILES {
            assert!(checked_relative_path(relative).is_ok(), "{relative}");
        }
        assert!(checked_relative_path("../escape").is_err());
        assert!(checked_relative_path("/etc/passwd").is_err());
        assert!(checked_relative_path("").is_err());
    }
}
