//! Shared helpers for the integration tests, one job per module, all re-exported here so that a
//! test says `use crate::util::*`.
#![allow(dead_code)]

mod client;
mod process;
mod runbook;
mod server;
mod sse;
mod tokens;
mod tools;

pub use client::*;
pub use process::*;
pub use runbook::*;
pub use server::*;
pub use sse::*;
pub use tokens::*;
pub use tools::*;
