//! Unit tests only: a deterministic property test feeding the runbook parser, the JWT decoder
//! and the HTTP request head parser random and mutated input (random bytes, deep nesting,
//! truncations of valid documents, tokens and heads); none may panic or overflow the stack, and
//! a head that is accepted must mean one thing only.
#![forbid(unsafe_code)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::http::head::{self, BodyFraming};
use crate::jwt;
use crate::runbook;

/// xorshift64*: small, fast and the same on every run, so a failure can be replayed by its case
/// number.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// Up to `max - 1` random bytes.
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max);
        (0..len).map(|_| self.next() as u8).collect()
    }
}

const VALID_RUNBOOK: &str = "# Fuzz\nAbout it.\n# Environment Requirements\n```yaml\nTARGET: host\nLEVEL: '3'\n```\n# File System Requirements\n```yaml\nInput:\n  - ./data\n  - ./more\n```\n# Required Claims\n```yaml\nroles: admin, ops\nteams:\n  - a\n  - b\n```\n# Concurrency\n```yaml\nmax: 2\n```\n# Script\n```sh\n#!/bin/sh\necho \"$TARGET\"\n```\n# History\n\n### 2026-01-01T00:00:00.000Z | Exit Code: 0 | Run: r1-x\n\n**Stdout:**\n```\nhost\n```\n";

/// Pieces that mean something to markdown or YAML, for insertions.
const FRAGMENTS: &[&str] = &[
    "```",
    "~~~",
    "````sh\n",
    "# Script\n",
    "# Environment Requirements\n",
    "\n",
    "\r\n",
    "\r",
    "[",
    "]",
    "{",
    "}",
    "- ",
    "  ",
    "\t",
    ": ",
    "&a ",
    "*a",
    "!!str ",
    "? ",
    "|\n",
    ">-\n",
    "'",
    "\"",
    "#",
    "\u{feff}",
    "\u{0}",
    "é",
    "\u{10ffff}",
    "---\n",
    "...\n",
    "%YAML 1.2\n",
];

/// How many ways [`deep_yaml`] knows to nest; the last is a random mix (not always valid).
const SHAPES: usize = 7;

/// A YAML block nested `depth` levels in the given shape (flow, block, indentation, mixed).
/// Indentation makes a block grow with the square of its depth, so those shapes stop at 400
/// levels, far beyond the limit all the same.
fn deep_yaml(rng: &mut Rng, shape: usize, depth: usize) -> String {
    match shape {
        0 => format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
        1 => format!("{}{}", "{a: ".repeat(depth), "}".repeat(depth)),
        2 => format!("{}x", "- ".repeat(depth)),
        3 => (0..depth.min(400)).fold(String::new(), |mut text, level| {
            text.push_str(&" ".repeat(level));
            text.push_str("k:\n");
            text
        }),
        4 => (0..depth.min(400)).fold(String::new(), |mut text, level| {
            text.push_str(&"  ".repeat(level));
            text.push_str("-\n");
            text
        }),
        5 => format!("{}{}", "[{a: ".repeat(depth / 2), "}]".repeat(depth / 2)),
        _ => (0..depth)
            .map(|_| *rng.pick(&["[", "{", "- ", "a: "]))
            .collect(),
    }
}

/// A runbook whose yaml sections hold `yaml`.
fn runbook_with_yaml(yaml: &str) -> String {
    format!(
        "# R\n# Environment Requirements\n```yaml\n{yaml}\n```\n# Required Claims\n```yaml\n{yaml}\n```\n# Concurrency\n```\n{yaml}\n```\n# Script\n```sh\necho hi\n```\n"
    )
}

fn mutate(rng: &mut Rng, original: &[u8]) -> Vec<u8> {
    let mut bytes = original.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(5) {
            0 => bytes.truncate(at),
            1 if at < bytes.len() => bytes[at] = rng.next() as u8,
            2 => {
                let fragment = rng.pick(FRAGMENTS).repeat(1 + rng.below(4));
                bytes.splice(at..at, fragment.bytes());
            }
            3 => {
                let end = (at + rng.below(64)).min(bytes.len());
                bytes.drain(at..end);
            }
            _ => {
                let end = (at + rng.below(256)).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy);
            }
        }
    }
    bytes
}

fn runbook_case(rng: &mut Rng) -> String {
    match rng.below(5) {
        0 => String::from_utf8_lossy(&rng.bytes(2048)).into_owned(),
        1 => {
            let depth = *rng.pick(&[63, 64, 65, 100, 1000, 3000, 5000]);
            let shape = rng.below(SHAPES);
            runbook_with_yaml(&deep_yaml(rng, shape, depth))
        }
        2 => {
            let depth = 1 + rng.below(80);
            let shape = rng.below(SHAPES);
            let yaml = deep_yaml(rng, shape, depth);
            String::from_utf8_lossy(&mutate(rng, runbook_with_yaml(&yaml).as_bytes())).into_owned()
        }
        _ => String::from_utf8_lossy(&mutate(rng, VALID_RUNBOOK.as_bytes())).into_owned(),
    }
}

#[test]
fn runbook_parser_survives_arbitrary_input() {
    let valid = runbook::parse(VALID_RUNBOOK);
    assert!(valid.problems.is_empty(), "{:?}", valid.problems);
    let mut rng = Rng::new(0x5eed_0001);
    let mut refused_deep = 0;
    for case in 0..20_000 {
        let text = runbook_case(&mut rng);
        let parsed = std::panic::catch_unwind(|| runbook::parse(&text));
        let Ok(book) = parsed else {
            panic!("case {case} panicked on {text:?}");
        };
        if book.problems.iter().any(|p| p.contains("deeper than")) {
            refused_deep += 1;
        }
        if let Some(script) = &book.script {
            let _ = runbook::interpreter_of(script);
        }
    }
    // The structured cases did reach the depth check.
    assert!(refused_deep > 1000, "{refused_deep}");
}

#[test]
fn nesting_is_refused_beyond_the_limit_in_every_shape() {
    let mut rng = Rng::new(7);
    for shape in 0..SHAPES - 1 {
        for (depth, refused) in [(runbook::MAX_YAML_DEPTH, false), (3000, true)] {
            let yaml = deep_yaml(&mut rng, shape, depth);
            let book = runbook::parse(&runbook_with_yaml(&yaml));
            // The parser's own flow limit may speak first; either way the block is refused.
            let deep = book
                .problems
                .iter()
                .any(|p| p.contains("deeper than") || p.contains("recursion limit exceeded"));
            assert_eq!(
                deep, refused,
                "shape {shape} depth {depth}: {:?}",
                book.problems
            );
            // At the limit a nested mapping is read: its top key is a requirement.
            if !refused && (shape == 1 || shape == 3) {
                assert_eq!(book.env_requirements.len(), 1, "{:?}", book.problems);
            }
        }
    }
}

const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef0123456789";

/// A token over arbitrary header and payload bytes, correctly signed with [`SECRET`].
fn sign(header: &[u8], payload: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).unwrap();
    mac.update(input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{input}.{signature}")
}

fn jwt_case(rng: &mut Rng, valid: &str) -> String {
    match rng.below(6) {
        0 => String::from_utf8_lossy(&rng.bytes(512)).into_owned(),
        1 => {
            let cut = rng.below(valid.len() + 1);
            valid[..cut].to_string()
        }
        2 => String::from_utf8_lossy(&mutate(rng, valid.as_bytes())).into_owned(),
        3 => {
            // A correctly signed token whose payload is arbitrary: the payload checks run.
            let payload = match rng.below(3) {
                0 => rng.bytes(256),
                1 => {
                    let depth = *rng.pick(&[10, 127, 128, 129, 5000]);
                    format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
                }
                _ => mutate(
                    rng,
                    json!({"sub": "u", "exp": 1e300, "nbf": -1e300, "iss": "dev-idp", "aud": ["dev-api"]})
                        .to_string()
                        .as_bytes(),
                ),
            };
            sign(br#"{"alg":"HS256","typ":"JWT"}"#, &payload)
        }
        4 => {
            let header = mutate(rng, br#"{"alg":"HS256","typ":"JWT"}"#);
            sign(&header, br#"{"exp":1}"#)
        }
        _ => {
            let parts: Vec<String> = (0..rng.below(6))
                .map(|_| URL_SAFE_NO_PAD.encode(rng.bytes(64)))
                .collect();
            parts.join(".")
        }
    }
}

#[test]
fn jwt_decoder_survives_arbitrary_input() {
    let claims = json!({"sub": "u", "exp": 2_000_000_000i64, "iss": "dev-idp", "aud": "dev-api"});
    let claims = claims.as_object().unwrap().clone();
    let valid = jwt::encode(&claims, SECRET);
    let validation = jwt::tests::validation();
    assert!(jwt::decode(&valid, SECRET, &validation).is_ok());
    let mut rng = Rng::new(0x5eed_0002);
    let mut reached_payload = 0;
    for case in 0..20_000 {
        let token = jwt_case(&mut rng, &valid);
        let decoded = std::panic::catch_unwind(|| jwt::decode(&token, SECRET, &validation));
        match decoded {
            Err(_) => panic!("case {case} panicked on {token:?}"),
            Ok(Err(jwt::JwtError::BadSignature | jwt::JwtError::Malformed)) => {}
            Ok(_) => reached_payload += 1,
        }
    }
    assert!(reached_payload > 100, "{reached_payload}");
}

const VALID_HEAD: &str = "POST /api/runbooks/a.md/execute?stream=true HTTP/1.1\r\nHost: x\r\n\
Authorization: Bearer abc.def.ghi\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\
Connection: keep-alive\r\nExpect: 100-continue\r\n\r\n";

/// Pieces that mean something to an HTTP head, for insertions.
const HEAD_FRAGMENTS: &[&str] = &[
    "\r\n",
    "\n",
    "\r",
    " ",
    "\t",
    ":",
    ",",
    "\0",
    "Content-Length: 5\r\n",
    "Content-Length: 6\r\n",
    "Transfer-Encoding: chunked\r\n",
    "Transfer-Encoding: gzip\r\n",
    "Connection: close\r\n",
    "HTTP/1.0",
    "HTTP/2",
    "\u{e9}",
    "\u{7f}",
];

fn head_case(rng: &mut Rng) -> Vec<u8> {
    match rng.below(4) {
        0 => rng.bytes(512),
        _ => {
            let mut bytes = VALID_HEAD.as_bytes().to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(bytes.len() + 1);
                if rng.below(2) == 0 {
                    bytes.splice(at..at, rng.pick(HEAD_FRAGMENTS).bytes());
                } else {
                    bytes = mutate(rng, &bytes);
                }
            }
            bytes
        }
    }
}

#[test]
fn head_parser_survives_arbitrary_input_and_accepts_only_unambiguous_heads() {
    assert!(head::parse(VALID_HEAD.as_bytes()).is_ok());
    let mut rng = Rng::new(0x5eed_0003);
    let mut accepted = 0;
    for case in 0..50_000 {
        let bytes = head_case(&mut rng);
        let skip = head::leading_empty_lines(&bytes);
        let Some(end) = head::head_end(&bytes[skip..], rng.below(bytes.len() + 1)) else {
            continue;
        };
        let head = &bytes[skip..skip + end];
        let parsed = std::panic::catch_unwind(|| head::parse(head));
        let Ok(result) = parsed else {
            panic!(
                "case {case} panicked on {:?}",
                String::from_utf8_lossy(head)
            );
        };
        let Ok(head) = result else {
            continue;
        };
        accepted += 1;
        let shown = format!("case {case}: {head:?}");
        assert!(
            !head.method.is_empty() && head.method == head.method.to_ascii_uppercase(),
            "{shown}"
        );
        assert!(
            !head.target.is_empty()
                && !head
                    .target
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control()),
            "{shown}"
        );
        for (name, value) in &head.headers {
            assert!(
                !name.is_empty() && *name == name.to_ascii_lowercase(),
                "{shown}"
            );
            assert!(!name.contains([' ', ':']), "{shown}");
            assert!(!value.contains(['\r', '\n', '\0']), "{shown}");
        }
        let has = |n: &str| head.headers.iter().any(|(name, _)| name == n);
        match head.framing {
            BodyFraming::Chunked => assert!(!has("content-length"), "{shown}"),
            BodyFraming::Length(_) => assert!(!has("transfer-encoding"), "{shown}"),
            BodyFraming::Empty => assert!(!has("transfer-encoding"), "{shown}"),
        }
    }
    // Enough mutated heads were still valid for the checks to mean something.
    assert!(accepted > 1_000, "{accepted}");
}
