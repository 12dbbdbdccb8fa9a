//! Which request parameters reach a script: only the names a runbook declares under
//! `# Environment Requirements` (others are dropped with a warning), and never a name that
//! changes how an interpreter or the dynamic loader starts (a runbook declaring one fails
//! validation).
#![forbid(unsafe_code)]

use crate::runbook::Runbook;
use crate::runenv::RequestVars;

/// Names a runbook may not declare: each one lets whoever sets it run code or load libraries
/// before (or instead of) the script, or changes how the shell reads the script.
///
/// Shells: `BASH_ENV`/`ENV` (a file sourced at start), `SHELLOPTS`/`BASHOPTS` (e.g. `xtrace`,
/// which expands `PS4`), `PS4`, `PROMPT_COMMAND`, `IFS`, `PATH`, `CDPATH`, `FPATH`, `ZDOTDIR`,
/// `BASH_XTRACEFD`, `BASH_LOADABLES_PATH`. glibc and the loader: `GCONV_PATH`, `LOCPATH`,
/// `NLSPATH`, `GLIBC_TUNABLES`, `HOSTALIASES`, `RESOLV_HOST_CONF`. Interpreters: `RUBYOPT`,
/// `RUBYLIB`, `PERLLIB`, `PERLIO`, `PERLDB_OPTS`, `NODE_OPTIONS`, `NODE_PATH`,
/// `JAVA_TOOL_OPTIONS`, `_JAVA_OPTIONS`, `JDK_JAVA_OPTIONS`, `CLASSPATH`, `PHPRC`,
/// `PHP_INI_SCAN_DIR`, `TCLLIBPATH`. Plus every name starting with one of
/// [`STARTUP_PREFIXES`].
///
/// Left out on purpose: `TMPDIR`, `HOME`, `LANG`/`LC_*`, `TZ` (they steer where files go or how
/// text is shown, not what code runs) and tool settings such as `GIT_SSH_COMMAND` (a runbook
/// that declares one hands its callers that tool's power knowingly).
pub const STARTUP_NAMES: &[&str] = &[
    "BASH_ENV",
    "ENV",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "PROMPT_COMMAND",
    "IFS",
    "PATH",
    "CDPATH",
    "FPATH",
    "ZDOTDIR",
    "BASH_XTRACEFD",
    "BASH_LOADABLES_PATH",
    "GCONV_PATH",
    "LOCPATH",
    "NLSPATH",
    "GLIBC_TUNABLES",
    "HOSTALIASES",
    "RESOLV_HOST_CONF",
    "RUBYOPT",
    "RUBYLIB",
    "PERLLIB",
    "PERLIO",
    "PERLDB_OPTS",
    "NODE_OPTIONS",
    "NODE_PATH",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "CLASSPATH",
    "PHPRC",
    "PHP_INI_SCAN_DIR",
    "TCLLIBPATH",
];

/// Name prefixes a runbook may not declare: the loader (`LD_`), exported bash functions
/// (`BASH_FUNC_`), Python (`PYTHONPATH`, `PYTHONSTARTUP`, `PYTHONWARNINGS`, …), Perl
/// (`PERL5OPT`, `PERL5LIB`, `PERL5DB`) and Lua (`LUA_INIT`, `LUA_PATH`, `LUA_CPATH`).
pub const STARTUP_PREFIXES: &[&str] = &["LD_", "BASH_FUNC_", "PYTHON", "PERL5", "LUA_"];

/// Whether `name` changes how an interpreter or the loader starts (names are case-sensitive).
pub fn changes_startup(name: &str) -> bool {
    STARTUP_NAMES.contains(&name) || STARTUP_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The validation errors for declared names that [`changes_startup`].
pub fn declaration_errors(book: &Runbook) -> Vec<String> {
    book.env_requirements
        .iter()
        .filter(|r| changes_startup(&r.name))
        .map(|r| {
            format!(
                "environment variable {} cannot be declared: it changes how an interpreter or the loader starts",
                r.name
            )
        })
        .collect()
}

/// The warning for a request variable the runbook does not declare.
pub fn undeclared_warning(name: &str) -> String {
    format!("{name} is not declared by this runbook")
}

/// Keeps the request's variables that `book` declares; each other one is dropped and named in
/// a warning. Warnings already present are kept first.
pub fn keep_declared(vars: &RequestVars, book: &Runbook) -> RequestVars {
    let mut out = RequestVars {
        vars: Vec::with_capacity(vars.vars.len()),
        warnings: vars.warnings.clone(),
    };
    for (name, value) in &vars.vars {
        if book.env_requirements.iter().any(|r| &r.name == name) {
            out.vars.push((name.clone(), value.clone()));
        } else {
            out.warnings.push(undeclared_warning(name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runbook::EnvRequirement;

    fn declaring(names: &[&str]) -> Runbook {
        Runbook {
            env_requirements: names
                .iter()
                .map(|n| EnvRequirement {
                    name: n.to_string(),
                    description: String::new(),
                })
                .collect(),
            ..Runbook::default()
        }
    }

    #[test]
    fn startup_names_are_recognised() {
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "BASH_ENV",
            "ENV",
            "SHELLOPTS",
            "BASHOPTS",
            "PS4",
            "PROMPT_COMMAND",
            "IFS",
            "PATH",
            "GCONV_PATH",
            "PYTHONPATH",
            "PYTHONSTARTUP",
            "PERL5OPT",
            "PERL5LIB",
            "RUBYOPT",
            "NODE_OPTIONS",
            "JAVA_TOOL_OPTIONS",
            "BASH_FUNC_x%%",
            "LUA_INIT",
        ] {
            assert!(changes_startup(name), "{name}");
        }
        for name in ["GATE", "MY_PATH", "PATHS", "env", "path", "HOME", "TMPDIR"] {
            assert!(!changes_startup(name), "{name}");
        }
    }

    #[test]
    fn declared_startup_names_are_errors_naming_them() {
        let errors = declaration_errors(&declaring(&["GATE", "BASH_ENV", "PYTHONPATH"]));
        assert_eq!(errors.len(), 2);
        assert!(errors[0].contains("BASH_ENV"));
        assert!(errors[1].contains("PYTHONPATH"));
        assert!(declaration_errors(&declaring(&["GATE"])).is_empty());
    }

    #[test]
    fn undeclared_variables_are_dropped_with_a_warning() {
        let vars = RequestVars {
            vars: vec![
                ("A".into(), "1".into()),
                ("BASH_ENV".into(), "$(id)".into()),
                ("B".into(), "2".into()),
            ],
            warnings: vec!["earlier".into()],
        };
        let kept = keep_declared(&vars, &declaring(&["A", "B", "C"]));
        assert_eq!(
            kept.vars,
            vec![("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert_eq!(
            kept.warnings,
            vec![
                "earlier".to_string(),
                "BASH_ENV is not declared by this runbook".to_string()
            ]
        );
    }
}
