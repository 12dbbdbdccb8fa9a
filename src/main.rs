//! runbookd's entry point: the server and its terminal client live in the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    runbookd::daemon::main(std::env::args_os().skip(1).collect())
}
