//! The one HTTP/SSE client of runbookd, shared by the terminal client (`cli`), the benchmark
//! and the integration tests: HTTP/1.1 over `TcpStream` with chunked decoding (`http`,
//! `chunked`, `lines`), the server's base URL (`url`), a WHATWG Server-Sent Events parser
//! (`sse`), and following a stream across dropped connections with `Last-Event-ID` (`resume`).
//! The integration tests keep their own SSE parser and token signer as independent oracles of
//! the framing and the tokens.
#![forbid(unsafe_code)]

pub(crate) mod chunked;
pub mod http;
pub(crate) mod lines;
pub(crate) mod resume;
pub mod sse;
pub mod url;
