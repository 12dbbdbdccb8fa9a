//! The environment a script runs with: the server's own variables minus its secrets, the
//! request's `env_vars` (checked here), and the system variables that tell a script who and
//! where it is and how to call the API back. A request can never set a system variable.
#![forbid(unsafe_code)]

use serde_json::Value;

/// Variables runbookd sets for every run; a request's values for them are dropped.
pub const SYSTEM_VARS: &[&str] = &[
    "RUNBOOK_API_TOKEN",
    "RUNBOOK_CORRELATION_ID",
    "RUNBOOK_URL",
    "RUNBOOK_RECURSION_STACK",
    "RUNBOOK_EXEC_DIR_HOST",
    "RUNBOOK_RUN_ID",
    "RUNBOOK_H_AUTH",
    "RUNBOOK_H_CORR",
    "RUNBOOK_H_RECUR",
    "RUNBOOK_H_CTYPE",
    "RUNBOOK_HEADERS",
];

/// The most bytes one request variable may have as the `NAME=value` string the script gets,
/// with its terminating NUL (128 KiB): the kernel's limit for one environment string
/// (`MAX_ARG_STRLEN`), beyond which the script could not even start.
pub const MAX_VALUE_BYTES: usize = 128 * 1024;
/// The most bytes all of a request's variable values may have together (512 KiB).
pub const MAX_TOTAL_BYTES: usize = 512 * 1024;

/// The request's variables, checked and cleaned, plus warnings about dropped ones.
#[derive(Debug, Default)]
pub struct RequestVars {
    pub vars: Vec<(String, String)>,
    pub warnings: Vec<String>,
}

/// Checks `env_vars` from a request body. Err: a client-safe reason (answered with 400).
/// A variable over [`MAX_VALUE_BYTES`], or values over [`MAX_TOTAL_BYTES`] together, are refused.
pub fn check_request_vars(env_vars: Option<&Value>) -> Result<RequestVars, String> {
    let mut out = RequestVars::default();
    let mut total = 0usize;
    let map = match env_vars {
        None | Some(Value::Null) => return Ok(out),
        Some(Value::Object(map)) => map,
        Some(_) => return Err("env_vars must be an object of strings".into()),
    };
    for (name, value) in map {
        if !is_valid_name(name) {
            return Err(format!(
                "invalid environment variable name {name:?}: use [A-Za-z_][A-Za-z0-9_]*"
            ));
        }
        if name.starts_with("LD_") {
            return Err(format!("environment variable {name} is not allowed"));
        }
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => {
                return Err(format!(
                    "env_vars.{name} must be a string, number or boolean"
                ))
            }
        };
        if name.len() + text.len() + 2 > MAX_VALUE_BYTES {
            return Err(format!(
                "env_vars.{name} is {} bytes; a variable may have at most 128 KiB ({MAX_VALUE_BYTES} bytes, counting NAME=, the value and a final NUL)",
                text.len()
            ));
        }
        total += text.len();
        if total > MAX_TOTAL_BYTES {
            return Err(format!(
                "env_vars values exceed {MAX_TOTAL_BYTES} bytes (512 KiB) in total"
            ));
        }
        if SYSTEM_VARS.contains(&name.as_str()) {
            out.warnings.push(format!(
                "{name} is set by the server; the value given was ignored"
            ));
            continue;
        }
        let cleaned: String = text
            .chars()
            .filter(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r'))
            .collect();
        out.vars.push((name.clone(), cleaned));
    }
    Ok(out)
}

/// `[A-Za-z_][A-Za-z0-9_]*`
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What the system variables are made of.
pub struct SystemValues<'a> {
    pub run_token: &'a str,
    pub correlation_id: &'a str,
    pub runbook_url: &'a str,
    /// The stack including this runbook, as JSON.
    pub recursion_stack_json: &'a str,
    pub exec_dir: &'a str,
    pub run_id: &'a str,
}

/// The full environment of a run: base (already free of secrets), then request vars, then
/// system vars, later entries replacing earlier ones of the same name.
pub fn build(
    base: &[(String, String)],
    request: &[(String, String)],
    sys: &SystemValues,
) -> Vec<(String, String)> {
    let h_auth = format!("Authorization: Bearer {}", sys.run_token);
    let h_corr = format!("X-Correlation-Id: {}", sys.correlation_id);
    let h_recur = format!("X-Recursion-Stack: {}", sys.recursion_stack_json);
    let h_ctype = "Content-Type: application/json".to_string();
    let headers = [&h_auth, &h_corr, &h_recur, &h_ctype]
        .iter()
        .map(|h| format!("-H {}", shell_quote(h)))
        .collect::<Vec<_>>()
        .join(" ");
    let system = [
        ("RUNBOOK_API_TOKEN", sys.run_token.to_string()),
        ("RUNBOOK_CORRELATION_ID", sys.correlation_id.to_string()),
        ("RUNBOOK_URL", sys.runbook_url.to_string()),
        (
            "RUNBOOK_RECURSION_STACK",
            sys.recursion_stack_json.to_string(),
        ),
        ("RUNBOOK_EXEC_DIR_HOST", sys.exec_dir.to_string()),
        ("RUNBOOK_RUN_ID", sys.run_id.to_string()),
        ("RUNBOOK_H_AUTH", h_auth),
        ("RUNBOOK_H_CORR", h_corr),
        ("RUNBOOK_H_RECUR", h_recur),
        ("RUNBOOK_H_CTYPE", h_ctype),
        ("RUNBOOK_HEADERS", headers),
    ];
    let mut env: Vec<(String, String)> =
        Vec::with_capacity(base.len() + request.len() + system.len());
    let mut put = |name: &str, value: String| {
        env.retain(|(n, _)| n != name);
        env.push((name.to_string(), value));
    };
    for (n, v) in base.iter().chain(request) {
        put(n, v.clone());
    }
    for (n, v) in system {
        put(n, v);
    }
    env
}

/// Single-quotes a word for sh.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_converted_and_checked() {
        let v = json!({"A": "x", "N": 3, "B": true});
        let r = check_request_vars(Some(&v)).unwrap();
        assert!(r.vars.contains(&("N".into(), "3".into())));
        assert!(r.vars.contains(&("B".into(), "true".into())));
        assert!(check_request_vars(Some(&json!({"A": null}))).is_err());
        assert!(check_request_vars(Some(&json!({"A": [1]}))).is_err());
        assert!(check_request_vars(Some(&json!({"1X": "a"}))).is_err());
        assert!(check_request_vars(Some(&json!({"LD_PRELOAD": "a"}))).is_err());
        assert!(check_request_vars(Some(&json!(["A"]))).is_err());
    }

    #[test]
    fn value_sizes_are_limited() {
        // "A=" + value + NUL fills the limit exactly.
        let big = "x".repeat(MAX_VALUE_BYTES - 3);
        assert!(check_request_vars(Some(&json!({ "A": big }))).is_ok());
        let over = "x".repeat(MAX_VALUE_BYTES - 2);
        let err = check_request_vars(Some(&json!({ "A": over }))).unwrap_err();
        assert!(
            err.contains("env_vars.A") && err.contains("128 KiB"),
            "{err}"
        );
        let four: serde_json::Map<String, Value> = ["A", "B", "C", "D"]
            .iter()
            .map(|n| (n.to_string(), json!(big)))
            .collect();
        let rest = MAX_TOTAL_BYTES - 4 * big.len();
        let mut full = four.clone();
        full.insert("E".into(), json!("x".repeat(rest)));
        assert!(check_request_vars(Some(&Value::Object(full))).is_ok());
        let mut over = four;
        over.insert("E".into(), json!("x".repeat(rest + 1)));
        let err = check_request_vars(Some(&Value::Object(over))).unwrap_err();
        assert!(err.contains("512 KiB"), "{err}");
    }

    #[test]
    fn system_vars_dropped_with_warning() {
        let r = check_request_vars(Some(&json!({"RUNBOOK_RUN_ID": "x"}))).unwrap();
        assert!(r.vars.is_empty());
        assert_eq!(r.warnings.len(), 1);
    }

    #[test]
    fn control_characters_removed() {
        let r = check_request_vars(Some(&json!({"A": "a\u{1b}[31mb\tc\n"}))).unwrap();
        assert_eq!(r.vars[0].1, "a[31mb\tc\n");
    }

    #[test]
    fn system_values_win() {
        let sys = SystemValues {
            run_token: "tok",
            correlation_id: "c1",
            runbook_url: "http://localhost:1/api/runbooks",
            recursion_stack_json: "[\"A.md\"]",
            exec_dir: "/tmp/x",
            run_id: "r1-x",
        };
        let env = build(
            &[
                ("PATH".into(), "/bin".into()),
                ("RUNBOOK_RUN_ID".into(), "evil".into()),
            ],
            &[("X".into(), "1".into())],
            &sys,
        );
        let get = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("RUNBOOK_RUN_ID"), Some("r1-x"));
        assert_eq!(get("X"), Some("1"));
        assert_eq!(
            get("RUNBOOK_H_RECUR"),
            Some("X-Recursion-Stack: [\"A.md\"]")
        );
        assert!(get("RUNBOOK_HEADERS")
            .unwrap()
            .contains("-H 'X-Recursion-Stack: [\"A.md\"]'"));
    }
}
