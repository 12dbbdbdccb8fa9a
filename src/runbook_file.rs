//! Opening a runbook file that a script may have replaced: never through a symbolic link, never
//! blocking (FIFO, device), only a regular file of bounded size; and the sidecar lock
//! `.<file>.lock` that orders History writers and the readers of a runbook.
#![forbid(unsafe_code)]

use std::fs::{self, File, FileType, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::path_lock::{self, PathLock};

/// The longest a History writer waits for the sidecar lock. Writers hold it for the time of
/// one read and one write, so only someone else holding it on purpose makes this run out.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The longest a reader waits for the sidecar lock before reading without it: a request is not
/// held up long by someone holding the lock on purpose.
pub const READ_LOCK_WAIT: Duration = Duration::from_secs(3);

const LOCK_POLL: Duration = Duration::from_millis(5);

/// Flags of every open of a runbook or its sidecar: no symlink, no blocking on a FIFO, never a
/// controlling terminal.
const HOSTILE_FILE_FLAGS: i32 = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;

/// Why a runbook file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// No file at the path (any more).
    #[error("the runbook file is gone")]
    Missing,
    /// The path is a symbolic link; links are never followed.
    #[error("the runbook is a symbolic link (links are never followed)")]
    Symlink,
    /// Not a regular file: what it is instead ("FIFO", "directory", ...).
    #[error("the runbook is not a regular file but a {0}")]
    NotRegular(&'static str),
    /// Larger than the limit (`RUNBOOK_MAX_BYTES`).
    #[error("the runbook is larger than RUNBOOK_MAX_BYTES ({max} bytes)")]
    TooLarge { max: u64 },
    /// The sidecar lock was held elsewhere for all of [`LOCK_WAIT`].
    #[error("the runbook's lock file was held elsewhere too long")]
    Busy,
    #[error("{0}")]
    Io(#[source] io::Error),
}

/// What an open error means for a runbook path.
fn open_error(error: io::Error) -> FileError {
    match error.raw_os_error() {
        Some(libc::ELOOP) => FileError::Symlink,
        Some(libc::ENOENT | libc::ENOTDIR) => FileError::Missing,
        // A socket, or a FIFO opened for writing with no reader.
        Some(libc::ENXIO) => FileError::NotRegular("socket or FIFO"),
        _ => FileError::Io(error),
    }
}

/// A short name for a file type that is not a regular file.
pub fn kind_of(file_type: FileType) -> &'static str {
    if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_dir() {
        "directory"
    } else if file_type.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Opens the runbook at `path` for reading (and appending, with `append`), without following a
/// symlink and without blocking; refuses anything but a regular file of at most `max` bytes.
/// Returns the file and what it was when opened.
pub fn open(path: &Path, append: bool, max: u64) -> Result<(File, fs::Metadata), FileError> {
    let file = OpenOptions::new()
        .read(true)
        .append(append)
        .custom_flags(HOSTILE_FILE_FLAGS)
        .open(path)
        .map_err(open_error)?;
    let metadata = file.metadata().map_err(FileError::Io)?;
    if !metadata.is_file() {
        return Err(FileError::NotRegular(kind_of(metadata.file_type())));
    }
    if metadata.len() > max {
        return Err(FileError::TooLarge { max });
    }
    Ok((file, metadata))
}

/// Reads at most `max` bytes of `file`, `opened` when it was opened; a file that has grown past
/// them (or never ends) is TooLarge.
pub fn read_bounded(file: &File, opened: &fs::Metadata, max: u64) -> Result<Vec<u8>, FileError> {
    // Room for the whole file as it was (and one more byte, to see it grew past `max`), so
    // that it is read in one call instead of in doubling pieces.
    let size = opened.len().min(max);
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0).saturating_add(1));
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(FileError::Io)?;
    if bytes.len() as u64 > max {
        return Err(FileError::TooLarge { max });
    }
    Ok(bytes)
}

/// Whether `path` (not followed) is still the file that was `opened`.
pub fn still_at(opened: &fs::Metadata, path: &Path) -> Result<bool, FileError> {
    match fs::symlink_metadata(path) {
        Ok(now) => Ok(now.dev() == opened.dev() && now.ino() == opened.ino()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(FileError::Io(error)),
    }
}

/// The sidecar lock file of a runbook: `.<file>.lock` beside it (hidden, and not `.md`, so it
/// is never listed as a runbook).
pub fn lock_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.lock"))
}

/// A held sidecar lock; released when dropped (the file lock first, then this process's turn).
#[derive(Debug)]
pub struct Lock {
    _file: File,
    _turn: PathLock,
}

/// Takes the sidecar lock of the runbook at `path`, shared (readers) or exclusive (writers),
/// waiting at most `wait`. The runbook itself is never locked, so nothing a script does to it
/// can block the server; a sidecar replaced while it was being locked is locked again. The
/// threads of this server queue for their turn in memory first (`path_lock`: woken, not
/// polling, writers first), so only another process holding the file lock makes this poll.
pub fn lock(path: &Path, exclusive: bool, wait: Duration) -> Result<Lock, FileError> {
    let sidecar = lock_path(path);
    let deadline = crate::clock::instant_after(wait);
    let turn = path_lock::acquire(&sidecar, exclusive, deadline).ok_or(FileError::Busy)?;
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(HOSTILE_FILE_FLAGS)
            .open(&sidecar)
            .map_err(open_error)?;
        let metadata = file.metadata().map_err(FileError::Io)?;
        if !metadata.is_file() {
            return Err(FileError::NotRegular(kind_of(metadata.file_type())));
        }
        loop {
            let attempt = if exclusive {
                file.try_lock()
            } else {
                file.try_lock_shared()
            };
            match attempt {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(LOCK_POLL);
                }
                Err(fs::TryLockError::WouldBlock) => return Err(FileError::Busy),
                Err(fs::TryLockError::Error(error)) => return Err(FileError::Io(error)),
            }
        }
        // Someone may have removed or replaced the sidecar meanwhile: a lock on a file nobody
        // else can open any more orders nothing.
        if still_at(&metadata, &sidecar)? {
            return Ok(Lock {
                _file: file,
                _turn: turn,
            });
        }
        if Instant::now() >= deadline {
            return Err(FileError::Busy);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dirs::{mkfifo, TempDir};
    use std::os::unix::fs::symlink;

    #[test]
    fn refuses_symlinks_fifos_and_big_files() {
        let dir = TempDir::new("runbook-file");
        let path = dir.write("ok.md", b"# Ok\n");
        let (file, opened) = open(&path, false, 5).unwrap();
        assert_eq!(read_bounded(&file, &opened, 5).unwrap(), b"# Ok\n");
        assert!(matches!(
            open(&path, false, 4),
            Err(FileError::TooLarge { max: 4 })
        ));
        let zero = open(Path::new("/dev/zero"), false, 1 << 20);
        assert!(matches!(
            zero,
            Err(FileError::NotRegular("character device"))
        ));
        let link = dir.path().join("link.md");
        symlink("/dev/zero", &link).unwrap();
        assert!(matches!(
            open(&link, true, 1 << 20),
            Err(FileError::Symlink)
        ));
        let fifo = dir.path().join("fifo.md");
        mkfifo(&fifo);
        assert!(matches!(
            open(&fifo, true, 1 << 20),
            Err(FileError::NotRegular("FIFO"))
        ));
        assert!(matches!(
            open(&dir.path().join("gone.md"), false, 1),
            Err(FileError::Missing)
        ));
    }

    #[test]
    fn a_growing_file_is_read_no_further_than_the_limit() {
        let dir = TempDir::new("runbook-file-grow");
        let path = dir.write("grow.md", b"12345");
        let (file, opened) = open(&path, false, 8).unwrap();
        fs::write(&path, b"123456789").unwrap();
        assert!(matches!(
            read_bounded(&file, &opened, 8),
            Err(FileError::TooLarge { max: 8 })
        ));
    }

    #[test]
    fn sidecar_lock_is_hidden_and_exclusive() {
        let dir = TempDir::new("runbook-file-lock");
        let path = dir.write("R.md", b"# R\n");
        assert_eq!(lock_path(&path), dir.path().join(".R.md.lock"));
        let held = lock(&path, true, LOCK_WAIT).unwrap();
        assert!(matches!(
            lock(&path, false, Duration::from_millis(30)),
            Err(FileError::Busy)
        ));
        drop(held);
        let first = lock(&path, false, LOCK_WAIT).unwrap();
        let second = lock(&path, false, Duration::from_millis(30)).unwrap();
        assert!(matches!(
            lock(&path, true, Duration::from_millis(30)),
            Err(FileError::Busy)
        ));
        drop((first, second));
        // A sidecar swapped for a FIFO is refused, not waited on.
        fs::remove_file(lock_path(&path)).unwrap();
        mkfifo(&lock_path(&path));
        assert!(matches!(
            lock(&path, true, LOCK_WAIT),
            Err(FileError::NotRegular("FIFO"))
        ));
    }
}
