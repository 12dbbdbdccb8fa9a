//! Unit-test helpers: fresh, uniquely named directories under the system temp dir, FIFOs, and
//! waiting for what a background thread does.
#![forbid(unsafe_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A new empty directory `runbookd-<label>-<pid>-<n>` that stays after the test (for files a
/// test reopens by path after dropping what wrote them).
pub fn fresh_dir(label: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "runbookd-{label}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("cannot create a test directory");
    dir
}

/// Waits until `done` (polled every 5 ms), failing the test after 10 s with `what`.
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Makes a FIFO at `path` (with `mkfifo`, so that the tests need no unsafe code).
pub fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("cannot run mkfifo");
    assert!(status.success(), "mkfifo {} failed", path.display());
}

/// A [`fresh_dir`] that is removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        TempDir(fresh_dir(label))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `content` to `name` in the directory; returns its path.
    pub fn write(&self, name: &str, content: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, content).expect("cannot write a test file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
