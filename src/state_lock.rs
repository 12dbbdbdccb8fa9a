//! One runbookd per STATE_DIR: an exclusive lock (`flock`) on the STATE_DIR directory itself,
//! held for the life of the process. Two instances on one STATE_DIR would each take the other's
//! running runs for runs a killed server left going (and end them) and prune each other's
//! records; the second is refused at start instead. The kernel drops the lock when the process ends, `kill -9`
//! included, and scripts never hold it (the descriptor is close-on-exec). The directory is
//! opened read-only: no file is added, and a read-only remount is not blocked.
#![forbid(unsafe_code)]

use std::fs::{File, TryLockError};
use std::io;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateLockError {
    /// Another process holds the lock.
    #[error("another runbookd is using this STATE_DIR (every instance needs its own)")]
    InUse,
    #[error("cannot lock it: {0}")]
    Io(#[source] io::Error),
}

/// Held while the server runs; dropping it releases the lock.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Takes the lock of `state_dir` (which must exist), or says who has it.
pub fn acquire(state_dir: &Path) -> Result<StateLock, StateLockError> {
    let file = File::open(state_dir).map_err(StateLockError::Io)?;
    match file.try_lock() {
        Ok(()) => Ok(StateLock { _file: file }),
        Err(TryLockError::WouldBlock) => Err(StateLockError::InUse),
        Err(TryLockError::Error(e)) => Err(StateLockError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dirs::TempDir;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = TempDir::new("state-lock");
        let first = acquire(dir.path()).unwrap();
        assert!(matches!(acquire(dir.path()), Err(StateLockError::InUse)));
        drop(first);
        let again = acquire(dir.path());
        assert!(again.is_ok(), "{again:?}");
    }

    #[test]
    fn a_missing_directory_is_an_io_error() {
        let dir = TempDir::new("state-lock-missing");
        let absent = dir.path().join("absent");
        assert!(matches!(acquire(&absent), Err(StateLockError::Io(_))));
    }
}
