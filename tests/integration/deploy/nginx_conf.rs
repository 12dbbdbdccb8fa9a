//! The shipped files as text: reading them, enabling nginx/runbookd.conf's optional lines, a
//! site config around a given upstream, and a small nginx config parser for checks of the text.

use std::fs;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Shipped files
// ---------------------------------------------------------------------------------------------

pub(crate) fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub(crate) fn shipped(rel: &str) -> String {
    fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

pub(crate) fn shipped_nginx_conf() -> String {
    shipped("nginx/runbookd.conf")
}

/// Replaces the one occurrence of `from` in `text`; panics unless there is exactly one.
pub(crate) fn replace_once(text: &str, from: &str, to: &str) -> String {
    let count = text.matches(from).count();
    assert_eq!(
        count, 1,
        "expected {from:?} exactly once in the config, found {count}"
    );
    text.replacen(from, to, 1)
}

/// The shipped config pointed at runbookd on `upstream_port`, listening on `listen_port`.
pub(crate) fn site_conf(conf: &str, upstream_port: u16, listen_port: u16) -> String {
    let conf = replace_once(
        conf,
        "    server 127.0.0.1:8083;",
        &format!("    server 127.0.0.1:{upstream_port};"),
    );
    replace_once(
        &conf,
        "listen 8080;",
        &format!("listen 127.0.0.1:{listen_port};"),
    )
}

/// Enables the optional lines (a `#` directly followed by a directive) for which `wanted` holds.
pub(crate) fn enable_optional(conf: &str, wanted: impl Fn(&str) -> bool) -> String {
    conf.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            let indent = &line[..line.len() - trimmed.len()];
            let optional = trimmed
                .strip_prefix('#')
                .filter(|rest| rest.starts_with(|c: char| !c.is_whitespace() && c != '#'));
            match optional {
                Some(directive) if wanted(line) => format!("{indent}{directive}\n"),
                _ => format!("{line}\n"),
            }
        })
        .collect()
}

/// Optional lines of the several-instances example.
pub(crate) fn is_multi_instance_line(line: &str) -> bool {
    line.contains("runbookd_r") || line.contains("127.0.0.1:8084")
}

/// The shipped config with its several-instances lines enabled: instance `r1` on `r1_port`,
/// `r2` on `r2_port`, nginx listening on `listen_port`.
pub(crate) fn several_instances_conf(r1_port: u16, r2_port: u16, listen_port: u16) -> String {
    let conf = enable_optional(&shipped_nginx_conf(), is_multi_instance_line)
        .replace("127.0.0.1:8083", &format!("127.0.0.1:{r1_port}"))
        .replace("127.0.0.1:8084", &format!("127.0.0.1:{r2_port}"));
    replace_once(
        &conf,
        "listen 8080;",
        &format!("listen 127.0.0.1:{listen_port};"),
    )
}

// ---------------------------------------------------------------------------------------------
// A small nginx config parser (for checks of the shipped text)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) struct Directive {
    pub(crate) name: String,
    pub(crate) args: Vec<String>,
    pub(crate) block: Option<Vec<Directive>>,
}

pub(crate) fn nginx_tokens(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '#' {
            while chars.next().is_some_and(|c| c != '\n') {}
        } else if c == '{' || c == '}' || c == ';' {
            tokens.push(c.to_string());
            chars.next();
        } else if c == '"' || c == '\'' {
            chars.next();
            let mut word = String::new();
            while let Some(ch) = chars.next() {
                match ch {
                    '\\' => word.extend(chars.next()),
                    _ if ch == c => break,
                    _ => word.push(ch),
                }
            }
            tokens.push(word);
        } else {
            let mut word = String::new();
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() || ch == '{' || ch == '}' || ch == ';' {
                    break;
                }
                word.push(ch);
                chars.next();
            }
            tokens.push(word);
        }
    }
    tokens
}

pub(crate) fn parse_block(tokens: &[String], pos: &mut usize) -> Vec<Directive> {
    let mut out = Vec::new();
    while *pos < tokens.len() {
        if tokens[*pos] == "}" {
            *pos += 1;
            return out;
        }
        let name = tokens[*pos].clone();
        *pos += 1;
        let mut args = Vec::new();
        loop {
            let token = tokens
                .get(*pos)
                .unwrap_or_else(|| panic!("directive {name} is not terminated"));
            *pos += 1;
            match token.as_str() {
                ";" => {
                    out.push(Directive {
                        name,
                        args,
                        block: None,
                    });
                    break;
                }
                "{" => {
                    let block = parse_block(tokens, pos);
                    out.push(Directive {
                        name,
                        args,
                        block: Some(block),
                    });
                    break;
                }
                _ => args.push(token.clone()),
            }
        }
    }
    out
}

pub(crate) fn parse_nginx(text: &str) -> Vec<Directive> {
    let tokens = nginx_tokens(text);
    let mut pos = 0;
    parse_block(&tokens, &mut pos)
}

pub(crate) fn children<'a>(block: &'a [Directive], name: &str) -> Vec<&'a Directive> {
    block.iter().filter(|d| d.name == name).collect()
}

/// The one directive `name` of a block, as its arguments joined by spaces.
pub(crate) fn value_of(block: &[Directive], name: &str) -> Option<String> {
    let found = children(block, name);
    assert!(found.len() <= 1, "{name} set more than once: {found:?}");
    found.first().map(|d| d.args.join(" "))
}

pub(crate) fn all_directives(block: &[Directive]) -> Vec<&Directive> {
    let mut out = Vec::new();
    for d in block {
        out.push(d);
        if let Some(inner) = &d.block {
            out.extend(all_directives(inner));
        }
    }
    out
}

/// An nginx time value ("24h", "1h30m", "3s", "60") in seconds.
pub(crate) fn nginx_seconds(value: &str) -> u64 {
    let mut total = 0u64;
    let mut number = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number
            .parse()
            .unwrap_or_else(|_| panic!("bad time {value:?}"));
        number.clear();
        let unit = match c {
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0
            }
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            'M' => 30 * 86_400,
            'y' => 365 * 86_400,
            _ => panic!("bad time unit in {value:?}"),
        };
        total += n * unit;
    }
    if !number.is_empty() {
        total += number.parse::<u64>().unwrap();
    }
    total
}
