//! In-process readers-writer locks named by a path, with a deadline and writers first. The
//! threads of this process queue here before they take a file lock (`flock`) on the same path,
//! so they wait on a condition variable, woken when the holder lets go, instead of polling the
//! file lock; a waiting writer keeps new readers out, so a stream of readers cannot starve it.
//! Only other processes are left to contend for the file lock itself.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// Holders and waiting writers of one path.
#[derive(Debug, Default)]
struct Holders {
    readers: usize,
    writer: bool,
    writers_waiting: usize,
}

impl Holders {
    fn idle(&self) -> bool {
        self.readers == 0 && !self.writer && self.writers_waiting == 0
    }
}

struct Table {
    paths: Mutex<BTreeMap<PathBuf, Holders>>,
    changed: Condvar,
}

static TABLE: Table = Table {
    paths: Mutex::new(BTreeMap::new()),
    changed: Condvar::new(),
};

fn table() -> MutexGuard<'static, BTreeMap<PathBuf, Holders>> {
    // The table is consistent between statements: a panic elsewhere cannot leave it half done.
    TABLE.paths.lock().unwrap_or_else(|p| p.into_inner())
}

/// A held path lock; released when dropped.
#[derive(Debug)]
pub struct PathLock {
    path: PathBuf,
    exclusive: bool,
}

impl Drop for PathLock {
    fn drop(&mut self) {
        let mut paths = table();
        if let Some(holders) = paths.get_mut(&self.path) {
            if self.exclusive {
                holders.writer = false;
            } else {
                holders.readers = holders.readers.saturating_sub(1);
            }
            if holders.idle() {
                paths.remove(&self.path);
            }
        }
        drop(paths);
        TABLE.changed.notify_all();
    }
}

/// Takes the lock of `path`, shared or exclusive, waiting until `deadline` at most (`None`: it
/// was still held then).
pub fn acquire(path: &Path, exclusive: bool, deadline: Instant) -> Option<PathLock> {
    let mut paths = table();
    let mut counted_as_waiting = false;
    loop {
        let holders = paths.entry(path.to_path_buf()).or_default();
        let free = if exclusive {
            !holders.writer && holders.readers == 0
        } else {
            !holders.writer && holders.writers_waiting == 0
        };
        if free {
            if exclusive {
                holders.writer = true;
                if counted_as_waiting {
                    holders.writers_waiting -= 1;
                }
            } else {
                holders.readers += 1;
            }
            return Some(PathLock {
                path: path.to_path_buf(),
                exclusive,
            });
        }
        if exclusive && !counted_as_waiting {
            holders.writers_waiting += 1;
            counted_as_waiting = true;
        }
        let now = Instant::now();
        if now >= deadline {
            if counted_as_waiting {
                holders.writers_waiting -= 1;
                if holders.idle() {
                    paths.remove(path);
                }
                drop(paths);
                // Readers held back by this writer may go now.
                TABLE.changed.notify_all();
            }
            return None;
        }
        paths = TABLE
            .changed
            .wait_timeout(paths, deadline - now)
            .map(|(guard, _)| guard)
            .unwrap_or_else(|p| p.into_inner().0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[test]
    fn readers_share_and_writers_exclude() {
        let path = Path::new("/path-lock-test/a");
        let first = acquire(path, false, soon(0)).unwrap();
        let second = acquire(path, false, soon(0)).unwrap();
        assert!(acquire(path, true, soon(20)).is_none());
        drop((first, second));
        let writer = acquire(path, true, soon(0)).unwrap();
        assert!(acquire(path, false, soon(20)).is_none());
        assert!(acquire(path, true, soon(20)).is_none());
        // Another path is another lock.
        assert!(acquire(Path::new("/path-lock-test/b"), true, soon(0)).is_some());
        drop(writer);
        assert!(acquire(path, true, soon(0)).is_some());
        assert!(table().get(path).is_none(), "an idle path is forgotten");
    }

    #[test]
    fn a_waiting_writer_keeps_new_readers_out_and_gets_the_lock_next() {
        let path = Path::new("/path-lock-test/writer-first");
        let reader = acquire(path, false, soon(0)).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        std::thread::scope(|scope| {
            let writer_order = order.clone();
            scope.spawn(move || {
                let held = acquire(path, true, soon(5000)).unwrap();
                writer_order.lock().unwrap().push("writer");
                std::thread::sleep(Duration::from_millis(20));
                drop(held);
            });
            // Wait until the writer is queued.
            while table().get(path).is_none_or(|h| h.writers_waiting == 0) {
                std::thread::yield_now();
            }
            assert!(
                acquire(path, false, soon(20)).is_none(),
                "a new reader waits behind the queued writer"
            );
            let late_order = order.clone();
            scope.spawn(move || {
                let held = acquire(path, false, soon(5000)).unwrap();
                late_order.lock().unwrap().push("late reader");
                drop(held);
            });
            std::thread::sleep(Duration::from_millis(20));
            drop(reader);
        });
        assert_eq!(*order.lock().unwrap(), ["writer", "late reader"]);
    }

    #[test]
    fn a_writer_that_gives_up_lets_the_readers_in() {
        let path = Path::new("/path-lock-test/gives-up");
        let reader = acquire(path, false, soon(0)).unwrap();
        assert!(acquire(path, true, soon(30)).is_none());
        assert!(acquire(path, false, soon(0)).is_some());
        drop(reader);
    }

    #[test]
    fn many_threads_never_overlap_a_writer() {
        let path = Path::new("/path-lock-test/many");
        let inside = AtomicUsize::new(0);
        let writers_inside = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for i in 0..16 {
                let (inside, writers_inside) = (&inside, &writers_inside);
                scope.spawn(move || {
                    for _ in 0..200 {
                        let exclusive = i % 4 == 0;
                        let held = acquire(path, exclusive, soon(10_000)).unwrap();
                        let now = inside.fetch_add(1, Ordering::SeqCst);
                        if exclusive {
                            writers_inside.fetch_add(1, Ordering::SeqCst);
                            assert_eq!(now, 0, "a writer is alone");
                        } else {
                            assert_eq!(writers_inside.load(Ordering::SeqCst), 0);
                        }
                        std::thread::yield_now();
                        if exclusive {
                            writers_inside.fetch_sub(1, Ordering::SeqCst);
                        }
                        inside.fetch_sub(1, Ordering::SeqCst);
                        drop(held);
                    }
                });
            }
        });
        assert!(table().get(path).is_none());
    }
}
