//! The programs and privileges some tests need. Such a test is `#[ignore]`d for a plain
//! `cargo test` and requires them when it runs (CI installs them): a missing one fails it with
//! a message naming it, never skips it.

use std::fs;
use std::path::PathBuf;

/// A program's path: on PATH, or in the usual system directories (nginx lives in sbin).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Whether a program is found (see `find_program`).
pub fn have_program(name: &str) -> bool {
    find_program(name).is_some()
}

/// The path of a program the test cannot do without; fails the test if it is missing.
pub fn need_program(name: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| {
        panic!("{name} is not installed and this test needs it (install it; .ci/run does)")
    })
}

/// Fails the test unless it runs as root.
pub fn need_root(why: &str) {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no Uid: in /proc/self/status"));
    assert_eq!(uid, 0, "this test {why}: run it as root");
}
