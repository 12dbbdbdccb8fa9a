//! Parses a runbook's markdown into its parts: name, sections, requirements, script.
//!
//! Pure text processing, no I/O. Parsing never fails: anything malformed is skipped and described
//! in [`Runbook::problems`], so the caller can report it as a validation error.
#![forbid(unsafe_code)]

use crate::markdown;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::{Yaml, YamlLoader};

/// Title of the section listing the environment variables a script needs.
pub const ENVIRONMENT_SECTION: &str = "Environment Requirements";
/// Title of the section listing the input files and folders a script needs.
pub const FILE_SYSTEM_SECTION: &str = "File System Requirements";
/// Title of the optional section listing the token claims needed to validate or execute.
pub const REQUIRED_CLAIMS_SECTION: &str = "Required Claims";
/// Title of the optional section limiting concurrent executions.
pub const CONCURRENCY_SECTION: &str = "Concurrency";
/// Title of the section holding the script.
pub const SCRIPT_SECTION: &str = "Script";

/// An environment variable the script needs, with its description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvRequirement {
    pub name: String,
    pub description: String,
}

/// A token claim of which at least one of `values` must be held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequirement {
    pub claim: String,
    pub values: Vec<String>,
}

/// Everything runbookd needs to know about one runbook document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runbook {
    /// Text of the H1 on the first line, trimmed; `None` if the first line is not an H1.
    pub name: Option<String>,
    /// Titles of every H1 outside code blocks, in order, without the name line.
    pub sections: Vec<String>,
    /// From the yaml block under `# Environment Requirements`, in file order.
    pub env_requirements: Vec<EnvRequirement>,
    /// The `Input:` list under `# File System Requirements`.
    pub inputs: Vec<String>,
    /// From the yaml block under `# Required Claims`.
    pub required_claims: Vec<ClaimRequirement>,
    /// True when a `# Required Claims` block exists but could not be read completely: the claims
    /// are unknown, so access must be refused.
    pub required_claims_malformed: bool,
    /// `max` from the yaml block under `# Concurrency`.
    pub concurrency_max: Option<u32>,
    /// Content of the script's code block under `# Script`, without the fences, LF line endings.
    pub script: Option<String>,
    /// Human-readable problems found while parsing.
    pub problems: Vec<String>,
}

impl Runbook {
    /// Whether a section with this title exists (case-insensitive, whitespace-insensitive).
    pub fn has_section(&self, title: &str) -> bool {
        self.sections
            .iter()
            .any(|section| same_title(section, title))
    }
}

/// The interpreter that runs a script, as the kernel reads its `#!` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpreter {
    pub program: String,
    pub arg: Option<String>,
}

const DEFAULT_INTERPRETER: &str = "/bin/sh";

/// Code block languages taken as the script even without a `#!` line.
const SCRIPT_LANGUAGES: [&str; 4] = ["", "sh", "bash", "shell"];

/// The interpreter of a script read the kernel's way: first line `#!`, optional spaces/tabs, a path
/// (up to the next space/tab), then the rest of the line trimmed as at most ONE unsplit argument
/// (None if empty). No `#!` line (or an empty path) -> program "/bin/sh", arg None.
pub fn interpreter_of(script: &str) -> Interpreter {
    let default = Interpreter {
        program: DEFAULT_INTERPRETER.to_string(),
        arg: None,
    };
    let first_line = script.split('\n').next().unwrap_or_default();
    let first_line = first_line.strip_suffix('\r').unwrap_or(first_line);
    let Some(rest) = first_line.strip_prefix("#!") else {
        return default;
    };
    let rest = rest.trim_start_matches([' ', '\t']);
    let program_end = rest.find([' ', '\t']).unwrap_or(rest.len());
    let program = &rest[..program_end];
    if program.is_empty() {
        return default;
    }
    let arg = rest[program_end..].trim_matches([' ', '\t']);
    Interpreter {
        program: program.to_string(),
        arg: (!arg.is_empty()).then(|| arg.to_string()),
    }
}

/// Parses a runbook document. Never fails; see [`Runbook::problems`].
pub fn parse(markdown: &str) -> Runbook {
    let outline = Outline::of(markdown);
    let mut problems = Vec::new();
    if let Some(line) = outline.unclosed_fence_line {
        problems.push(format!(
            "the code block opened on line {line} is never closed"
        ));
    }

    let env_requirements = match outline.section_yaml(ENVIRONMENT_SECTION, &mut problems) {
        YamlBlock::Document(doc) => env_requirements(&doc, &mut problems),
        YamlBlock::Missing | YamlBlock::Malformed => Vec::new(),
    };
    let inputs = match outline.section_yaml(FILE_SYSTEM_SECTION, &mut problems) {
        YamlBlock::Document(doc) => inputs(&doc, &mut problems),
        YamlBlock::Missing | YamlBlock::Malformed => Vec::new(),
    };
    let (required_claims, required_claims_malformed) =
        match outline.section_yaml(REQUIRED_CLAIMS_SECTION, &mut problems) {
            YamlBlock::Document(doc) => required_claims(&doc, &mut problems),
            YamlBlock::Missing => (Vec::new(), false),
            YamlBlock::Malformed => (Vec::new(), true),
        };
    let concurrency_max = match outline.section_yaml(CONCURRENCY_SECTION, &mut problems) {
        YamlBlock::Document(doc) => concurrency_max(&doc, &mut problems),
        YamlBlock::Missing | YamlBlock::Malformed => None,
    };
    let script = outline.script();

    Runbook {
        name: outline.name,
        sections: outline.sections,
        env_requirements,
        inputs,
        required_claims,
        required_claims_malformed,
        concurrency_max,
        script,
        problems,
    }
}

/// Section titles compare case-insensitively, with runs of whitespace counting as one space.
fn same_title(a: &str, b: &str) -> bool {
    let a = a.split_whitespace().map(str::to_lowercase);
    let b = b.split_whitespace().map(str::to_lowercase);
    a.eq(b)
}

/// The title of an H1 line (`#` followed by a space, a tab or nothing), trimmed.
pub fn h1_title(line: &str) -> Option<&str> {
    markdown::h1_rest(line.as_bytes()).map(|_| line[1..].trim())
}

/// Text of a piece of the (UTF-8) document; the outline cuts only at ASCII bytes.
fn text_of(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

/// A fenced code block and the section it lies in.
struct CodeBlock<'a> {
    section: Option<usize>,
    language: String,
    body: Vec<&'a [u8]>,
}

impl CodeBlock<'_> {
    fn text(&self) -> String {
        self.body.iter().fold(String::new(), |mut text, line| {
            text.push_str(&text_of(line));
            text.push('\n');
            text
        })
    }
}

/// The outcome of reading the yaml block of a section.
enum YamlBlock {
    /// No such section, no code block in it, or an empty document.
    Missing,
    /// The block is not valid yaml (a problem has been recorded).
    Malformed,
    Document(Yaml),
}

/// The document's headings and code blocks, found in one pass.
struct Outline<'a> {
    name: Option<String>,
    sections: Vec<String>,
    blocks: Vec<CodeBlock<'a>>,
    /// 1-based line of a fence that is still open at the end of the document.
    unclosed_fence_line: Option<usize>,
}

impl<'a> Outline<'a> {
    /// The runbook's view of the markdown outline; a leading byte order mark is ignored.
    fn of(markdown: &'a str) -> Outline<'a> {
        let text = markdown.strip_prefix('\u{feff}').unwrap_or(markdown);
        let outline = markdown::Outline::of(text.as_bytes());
        Outline {
            name: outline.name.map(|title| text_of(title).trim().to_string()),
            sections: outline
                .sections
                .iter()
                .map(|section| text_of(section.title).trim().to_string())
                .collect(),
            blocks: outline
                .blocks
                .into_iter()
                .map(|block| CodeBlock {
                    section: block.section,
                    language: text_of(block.info)
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_lowercase(),
                    body: block.body,
                })
                .collect(),
            unclosed_fence_line: outline.unclosed_fence_line,
        }
    }

    fn section_index(&self, title: &str) -> Option<usize> {
        self.sections
            .iter()
            .position(|section| same_title(section, title))
    }

    fn blocks_in(&self, title: &str) -> impl Iterator<Item = &CodeBlock<'a>> {
        let section = self.section_index(title);
        self.blocks
            .iter()
            .filter(move |block| section.is_some() && block.section == section)
    }

    /// The first document of the first code block in the section titled `title`.
    fn section_yaml(&self, title: &str, problems: &mut Vec<String>) -> YamlBlock {
        let Some(block) = self.blocks_in(title).next() else {
            return YamlBlock::Missing;
        };
        match load_yaml(&block.text()) {
            Err(reason) => {
                problems.push(format!("{title}: {reason}"));
                YamlBlock::Malformed
            }
            Ok(documents) => {
                if documents.len() > 1 {
                    problems.push(format!(
                        "{title}: only the first of {} yaml documents is used",
                        documents.len()
                    ));
                }
                match documents.into_iter().next() {
                    None | Some(Yaml::Null) => YamlBlock::Missing,
                    Some(doc) => YamlBlock::Document(doc),
                }
            }
        }
    }

    /// The first code block under `# Script` that is untagged, tagged as a shell, or starts
    /// with a `#!` line.
    fn script(&self) -> Option<String> {
        self.blocks_in(SCRIPT_SECTION)
            .find(|block| {
                SCRIPT_LANGUAGES.contains(&block.language.as_str())
                    || block
                        .body
                        .first()
                        .is_some_and(|line| line.starts_with(b"#!"))
            })
            .map(CodeBlock::text)
    }
}

/// How deeply YAML collections may nest. The loader builds (and drops) documents recursively,
/// so without a bound a few thousand levels overflow the stack.
pub const MAX_YAML_DEPTH: usize = 64;

/// Walks the events of `text` without building anything (the parser itself keeps its state on
/// the heap) and refuses, before the recursive loader sees it, YAML that nests deeper than
/// [`MAX_YAML_DEPTH`] or uses aliases (which the loader would expand by copying).
fn check_yaml_shape(text: &str) -> Result<(), String> {
    let mut parser = Parser::new_from_str(text);
    let mut depth = 0usize;
    loop {
        let (event, _) = parser
            .next_token()
            .map_err(|error| format!("invalid YAML: {error}"))?;
        match event {
            Event::StreamEnd => return Ok(()),
            Event::Alias(_) => {
                return Err("YAML aliases (`*name`) are not supported".to_string());
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                depth += 1;
                if depth > MAX_YAML_DEPTH {
                    return Err(format!("YAML nests deeper than {MAX_YAML_DEPTH} levels"));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
}

fn load_yaml(text: &str) -> Result<Vec<Yaml>, String> {
    check_yaml_shape(text)?;
    YamlLoader::load_from_str(text).map_err(|error| format!("invalid YAML: {error}"))
}

/// The text of a scalar; `None` for null, lists, mappings and unreadable values.
fn scalar_text(value: &Yaml) -> Option<String> {
    match value {
        Yaml::String(text) | Yaml::Real(text) => Some(text.clone()),
        Yaml::Integer(number) => Some(number.to_string()),
        Yaml::Boolean(flag) => Some(flag.to_string()),
        _ => None,
    }
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn env_requirements(doc: &Yaml, problems: &mut Vec<String>) -> Vec<EnvRequirement> {
    let Some(map) = doc.as_hash() else {
        problems.push(format!(
            "{ENVIRONMENT_SECTION}: expected a mapping of `VARIABLE: description` lines"
        ));
        return Vec::new();
    };
    let mut requirements = Vec::new();
    for (key, value) in map {
        let Some(name) = scalar_text(key) else {
            problems.push(format!(
                "{ENVIRONMENT_SECTION}: a variable name is not a plain value"
            ));
            continue;
        };
        if !is_env_name(&name) {
            problems.push(format!(
                "{ENVIRONMENT_SECTION}: `{name}` is not a valid variable name"
            ));
        }
        let description = match value {
            Yaml::Null => String::new(),
            other => scalar_text(other).unwrap_or_else(|| {
                problems.push(format!(
                    "{ENVIRONMENT_SECTION}: the description of `{name}` is not a plain value"
                ));
                String::new()
            }),
        };
        requirements.push(EnvRequirement { name, description });
    }
    requirements
}

/// The value of `key` in a mapping, matching the key case-insensitively.
fn lookup<'y>(map: &'y yaml_rust2::yaml::Hash, key: &str) -> Option<&'y Yaml> {
    map.iter()
        .find(|(k, _)| {
            k.as_str()
                .is_some_and(|k| k.trim().eq_ignore_ascii_case(key))
        })
        .map(|(_, value)| value)
}

fn inputs(doc: &Yaml, problems: &mut Vec<String>) -> Vec<String> {
    let Some(map) = doc.as_hash() else {
        problems.push(format!(
            "{FILE_SYSTEM_SECTION}: expected a mapping with an `Input:` list"
        ));
        return Vec::new();
    };
    match lookup(map, "Input") {
        None | Some(Yaml::Null) => Vec::new(),
        Some(Yaml::Array(items)) => items
            .iter()
            .filter(|item| !item.is_null())
            .filter_map(|item| {
                let path = scalar_text(item);
                if path.is_none() {
                    problems.push(format!(
                        "{FILE_SYSTEM_SECTION}: an `Input:` entry is not a plain path"
                    ));
                }
                path
            })
            .filter(|path| !path.trim().is_empty())
            .collect(),
        Some(single) => match scalar_text(single) {
            Some(path) if !path.trim().is_empty() => vec![path],
            Some(_) => Vec::new(),
            None => {
                problems.push(format!(
                    "{FILE_SYSTEM_SECTION}: `Input:` must be a list of paths"
                ));
                Vec::new()
            }
        },
    }
}

/// The claim requirements, and whether the block could not be read completely.
fn required_claims(doc: &Yaml, problems: &mut Vec<String>) -> (Vec<ClaimRequirement>, bool) {
    let Some(map) = doc.as_hash() else {
        problems.push(format!(
            "{REQUIRED_CLAIMS_SECTION}: expected a mapping of `claim: value, value` lines"
        ));
        return (Vec::new(), true);
    };
    let mut malformed = false;
    let mut requirements = Vec::new();
    for (key, value) in map {
        let Some(claim) = scalar_text(key) else {
            problems.push(format!(
                "{REQUIRED_CLAIMS_SECTION}: a claim name is not a plain value"
            ));
            malformed = true;
            continue;
        };
        let mut values = Vec::new();
        match value {
            Yaml::Null => {}
            Yaml::Array(items) => {
                for item in items.iter().filter(|item| !item.is_null()) {
                    match scalar_text(item) {
                        Some(text) => values.push(text.trim().to_string()),
                        None => {
                            problems.push(format!(
                                "{REQUIRED_CLAIMS_SECTION}: a value of `{claim}` is not a plain value"
                            ));
                            malformed = true;
                        }
                    }
                }
            }
            other => match scalar_text(other) {
                Some(text) => values.extend(text.split(',').map(|part| part.trim().to_string())),
                None => {
                    problems.push(format!(
                        "{REQUIRED_CLAIMS_SECTION}: the values of `{claim}` are neither a list nor a comma separated string"
                    ));
                    malformed = true;
                }
            },
        }
        values.retain(|value| !value.is_empty());
        if values.is_empty() {
            problems.push(format!(
                "{REQUIRED_CLAIMS_SECTION}: `{claim}` lists no values, so nobody holds it"
            ));
        }
        requirements.push(ClaimRequirement { claim, values });
    }
    (requirements, malformed)
}

fn concurrency_max(doc: &Yaml, problems: &mut Vec<String>) -> Option<u32> {
    let bad = |problems: &mut Vec<String>| {
        problems.push(format!(
            "{CONCURRENCY_SECTION}: expected `max: N` with N a whole number of at least 1"
        ));
        None
    };
    let Some(value) = doc.as_hash().and_then(|map| lookup(map, "max")) else {
        return bad(problems);
    };
    let max = match value {
        Yaml::Integer(number) => u32::try_from(*number).ok(),
        Yaml::String(text) => text.trim().parse::<u32>().ok(),
        _ => None,
    };
    match max {
        Some(max) if max >= 1 => Some(max),
        _ => bad(problems),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# Deploy Package
Some introduction.

# Environment Requirements
```yaml
TARGET_HOST: Host to deploy to
RETRIES: 3
OPTIONAL_NOTE:
```

# File System Requirements
```yaml
Input:
  - ./CreatePackage
  - ./config.json
Output:
  - ./out
```

# Required Claims
```yaml
roles: developer, admin
groups: [ops]
```

# Concurrency
```yaml
max: 2
```

# Script
```sh
#!/bin/sh
# deploy the package
echo \"deploying to $TARGET_HOST\"
```

# History

### 2026-11-22T07:15:01.123Z | Exit Code: 0 | Run: r1-abc

**Stdout:**
```
# not a section
deploying
```
";

    fn requirement(name: &str, description: &str) -> EnvRequirement {
        EnvRequirement {
            name: name.to_string(),
            description: description.to_string(),
        }
    }

    #[test]
    fn parses_a_full_runbook() {
        let runbook = parse(SAMPLE);
        assert_eq!(runbook.name.as_deref(), Some("Deploy Package"));
        assert_eq!(
            runbook.sections,
            vec![
                "Environment Requirements",
                "File System Requirements",
                "Required Claims",
                "Concurrency",
                "Script",
                "History"
            ]
        );
        assert_eq!(
            runbook.env_requirements,
            vec![
                requirement("TARGET_HOST", "Host to deploy to"),
                requirement("RETRIES", "3"),
                requirement("OPTIONAL_NOTE", ""),
            ]
        );
        assert_eq!(runbook.inputs, vec!["./CreatePackage", "./config.json"]);
        assert_eq!(
            runbook.required_claims,
            vec![
                ClaimRequirement {
                    claim: "roles".to_string(),
                    values: vec!["developer".to_string(), "admin".to_string()],
                },
                ClaimRequirement {
                    claim: "groups".to_string(),
                    values: vec!["ops".to_string()],
                },
            ]
        );
        assert!(!runbook.required_claims_malformed);
        assert_eq!(runbook.concurrency_max, Some(2));
        assert_eq!(
            runbook.script.as_deref(),
            Some("#!/bin/sh\n# deploy the package\necho \"deploying to $TARGET_HOST\"\n")
        );
        assert!(runbook.problems.is_empty(), "{:?}", runbook.problems);
        assert!(runbook.has_section("environment requirements"));
        assert!(runbook.has_section("HISTORY"));
        assert!(runbook.has_section("  file system   requirements "));
        assert!(!runbook.has_section("Deploy Package"));
    }

    #[test]
    fn crlf_line_endings_parse_like_lf() {
        let crlf = SAMPLE.replace('\n', "\r\n");
        let lf = parse(SAMPLE);
        let from_crlf = parse(&crlf);
        assert_eq!(from_crlf, lf);
    }

    #[test]
    fn missing_sections_leave_fields_empty() {
        let runbook = parse("# Only a name\n\nSome text.\n## Script\n```sh\necho hi\n```\n");
        assert_eq!(runbook.name.as_deref(), Some("Only a name"));
        assert!(runbook.sections.is_empty());
        assert!(runbook.env_requirements.is_empty());
        assert!(runbook.inputs.is_empty());
        assert!(runbook.required_claims.is_empty());
        assert!(!runbook.required_claims_malformed);
        assert_eq!(runbook.concurrency_max, None);
        assert_eq!(runbook.script, None);
        assert!(runbook.problems.is_empty());
        assert!(!runbook.has_section("Script"));
    }

    #[test]
    fn no_name_when_first_line_is_not_an_h1() {
        let runbook = parse("\n# Script\n```\necho hi\n```\n");
        assert_eq!(runbook.name, None);
        assert_eq!(runbook.sections, vec!["Script"]);
        assert_eq!(runbook.script.as_deref(), Some("echo hi\n"));

        let runbook = parse("#NoSpace\n# Script\n");
        assert_eq!(runbook.name, None);
        assert_eq!(parse("").name, None);
        assert_eq!(parse("\u{feff}# Bom\n").name.as_deref(), Some("Bom"));
    }

    #[test]
    fn empty_and_null_blocks_mean_no_requirements() {
        let runbook = parse(
            "# R\n# Environment Requirements\n```yaml\n```\n# File System Requirements\n```yaml\nInput:\n```\n# Required Claims\n```yaml\n```\n",
        );
        assert!(runbook.env_requirements.is_empty());
        assert!(runbook.inputs.is_empty());
        assert!(runbook.required_claims.is_empty());
        assert!(!runbook.required_claims_malformed);
        assert!(runbook.problems.is_empty(), "{:?}", runbook.problems);
    }

    #[test]
    fn script_with_and_without_shebang() {
        let with = parse("# R\n# Script\n```bash\n#!/bin/bash -e\necho hi\n```\n");
        let script = with.script.unwrap();
        assert_eq!(script, "#!/bin/bash -e\necho hi\n");
        assert_eq!(
            interpreter_of(&script),
            Interpreter {
                program: "/bin/bash".to_string(),
                arg: Some("-e".to_string()),
            }
        );

        let without = parse("# R\n# Script\n```shell\necho hi\n```\n");
        let script = without.script.unwrap();
        assert_eq!(script, "echo hi\n");
        assert_eq!(
            interpreter_of(&script),
            Interpreter {
                program: "/bin/sh".to_string(),
                arg: None,
            }
        );
    }

    #[test]
    fn script_block_choice() {
        // A block in another language is skipped unless it starts with `#!`.
        let runbook =
            parse("# R\n# Script\n```text\nexample\n```\n```python\n#!/usr/bin/env python3\nprint(1)\n```\n");
        assert_eq!(
            runbook.script.as_deref(),
            Some("#!/usr/bin/env python3\nprint(1)\n")
        );
        let runbook = parse("# R\n# Script\n```text\nexample\n```\n");
        assert_eq!(runbook.script, None);
        let runbook = parse("# R\n# Script\n~~~sh\necho ```\n~~~\n");
        assert_eq!(runbook.script.as_deref(), Some("echo ```\n"));
        let runbook = parse("# R\n# Script\n```sh\n```\n");
        assert_eq!(runbook.script.as_deref(), Some(""));
    }

    #[test]
    fn interpreter_is_read_the_kernel_way() {
        assert_eq!(
            interpreter_of("#!/usr/bin/env python3 -u\nprint(1)\n"),
            Interpreter {
                program: "/usr/bin/env".to_string(),
                arg: Some("python3 -u".to_string()),
            }
        );
        assert_eq!(
            interpreter_of("#!  /bin/bash\necho\n"),
            Interpreter {
                program: "/bin/bash".to_string(),
                arg: None,
            }
        );
        assert_eq!(
            interpreter_of("#!\t/bin/bash \t -x  \r\n"),
            Interpreter {
                program: "/bin/bash".to_string(),
                arg: Some("-x".to_string()),
            }
        );
        assert_eq!(interpreter_of("#!   \necho").program, "/bin/sh");
        assert_eq!(interpreter_of("#!").program, "/bin/sh");
        assert_eq!(interpreter_of("").program, "/bin/sh");
        assert_eq!(interpreter_of(" #!/bin/bash\n").program, "/bin/sh");
        assert_eq!(interpreter_of("# !/bin/bash\n").program, "/bin/sh");
    }

    #[test]
    fn claims_as_string_and_list() {
        let runbook = parse(
            "# R\n# Required Claims\n```yaml\nroles: ' a , b,, '\nteams:\n  - x\n  - ' y '\n  - ''\nlevel: 3\n```\n",
        );
        let claims: Vec<(&str, Vec<&str>)> = runbook
            .required_claims
            .iter()
            .map(|c| {
                (
                    c.claim.as_str(),
                    c.values.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            claims,
            vec![
                ("roles", vec!["a", "b"]),
                ("teams", vec!["x", "y"]),
                ("level", vec!["3"]),
            ]
        );
        assert!(!runbook.required_claims_malformed);
        assert!(runbook.problems.is_empty(), "{:?}", runbook.problems);
    }

    #[test]
    fn claim_without_values_is_kept_and_reported() {
        let runbook = parse("# R\n# Required Claims\n```yaml\nroles: ' , '\n```\n");
        assert_eq!(runbook.required_claims.len(), 1);
        assert!(runbook.required_claims[0].values.is_empty());
        assert_eq!(runbook.problems.len(), 1);
    }

    #[test]
    fn unreadable_claims_are_flagged() {
        let bad_yaml = parse("# R\n# Required Claims\n```yaml\nroles: [a, b\n```\n");
        assert!(bad_yaml.required_claims_malformed);
        assert_eq!(bad_yaml.problems.len(), 1);
        assert!(bad_yaml.problems[0].starts_with("Required Claims: invalid YAML"));

        let not_a_map = parse("# R\n# Required Claims\n```yaml\n- admin\n```\n");
        assert!(not_a_map.required_claims_malformed);

        let nested = parse("# R\n# Required Claims\n```yaml\nroles: {a: b}\n```\n");
        assert!(nested.required_claims_malformed);
    }

    #[test]
    fn bad_yaml_is_a_problem_not_a_panic() {
        let runbook = parse(
            "# R\n# Environment Requirements\n```yaml\nA: [1, 2\n\tB: x\n```\n# File System Requirements\n```yaml\nInput: {a: [}\n```\n# Script\n```sh\necho ok\n```\n",
        );
        assert!(runbook.env_requirements.is_empty());
        assert!(runbook.inputs.is_empty());
        assert_eq!(runbook.problems.len(), 2, "{:?}", runbook.problems);
        assert!(runbook.problems[0].starts_with("Environment Requirements: invalid YAML"));
        assert!(runbook.problems[1].starts_with("File System Requirements: invalid YAML"));
        assert_eq!(runbook.script.as_deref(), Some("echo ok\n"));
    }

    #[test]
    fn deeply_nested_yaml_is_refused_without_overflow() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let runbook = parse(&format!(
            "# R\n# Environment Requirements\n```yaml\n{deep}\n```\n"
        ));
        assert_eq!(runbook.problems.len(), 1);
    }

    #[test]
    fn yaml_aliases_are_refused() {
        let runbook = parse("# R\n# Environment Requirements\n```yaml\nA: &d text\nB: *d\n```\n");
        assert!(runbook.env_requirements.is_empty());
        assert_eq!(runbook.problems.len(), 1);
        assert!(runbook.problems[0].contains("aliases"));
    }

    #[test]
    fn wrong_types_are_problems() {
        let runbook = parse(
            "# R\n# Environment Requirements\n```yaml\n- A\n```\n# File System Requirements\n```yaml\nInput:\n  - ./ok\n  - [nested]\n```\n",
        );
        assert!(runbook.env_requirements.is_empty());
        assert_eq!(runbook.inputs, vec!["./ok"]);
        assert_eq!(runbook.problems.len(), 2, "{:?}", runbook.problems);

        let runbook =
            parse("# R\n# Environment Requirements\n```yaml\nbad-name: x\nLIST: [1]\n```\n");
        assert_eq!(
            runbook.env_requirements,
            vec![requirement("bad-name", "x"), requirement("LIST", "")]
        );
        assert_eq!(runbook.problems.len(), 2, "{:?}", runbook.problems);
    }

    #[test]
    fn single_input_string_is_accepted() {
        let runbook = parse("# R\n# File System Requirements\n```yaml\ninput: ./data\n```\n");
        assert_eq!(runbook.inputs, vec!["./data"]);
        assert!(runbook.problems.is_empty());
    }

    #[test]
    fn concurrency_max_values() {
        let max_of = |yaml: &str| {
            let runbook = parse(&format!("# R\n# Concurrency\n```yaml\n{yaml}\n```\n"));
            (runbook.concurrency_max, runbook.problems.len())
        };
        assert_eq!(max_of("max: 1"), (Some(1), 0));
        assert_eq!(max_of("max: '4'"), (Some(4), 0));
        assert_eq!(max_of("max: 0"), (None, 1));
        assert_eq!(max_of("max: -3"), (None, 1));
        assert_eq!(max_of("max: 1.5"), (None, 1));
        assert_eq!(max_of("max: 99999999999"), (None, 1));
        assert_eq!(max_of("max: many"), (None, 1));
        assert_eq!(max_of("limit: 2"), (None, 1));
        assert_eq!(max_of(""), (None, 0));
    }

    #[test]
    fn comments_inside_the_script_are_not_sections() {
        let runbook = parse(
            "# R\n# Script\n```sh\n# foo\necho hi\n# Environment Requirements\n```\n# History\n",
        );
        assert_eq!(runbook.sections, vec!["Script", "History"]);
        assert!(!runbook.has_section("foo"));
        assert_eq!(
            runbook.script.as_deref(),
            Some("# foo\necho hi\n# Environment Requirements\n")
        );
    }

    #[test]
    fn history_blocks_are_not_taken_for_the_script() {
        let history_first = "# R\n# History\n\n### t | Exit Code: 0\n\n**Stdout:**\n```\nold output\n```\n# Script\n```sh\necho new\n```\n";
        assert_eq!(parse(history_first).script.as_deref(), Some("echo new\n"));

        let no_script = "# R\n# Script\nnothing yet\n# History\n```\nold output\n```\n";
        assert_eq!(parse(no_script).script, None);

        let runbook = parse(SAMPLE);
        assert!(!runbook.script.unwrap().contains("deploying\n"));
    }

    #[test]
    fn fences_need_matching_markers_to_close() {
        let runbook = parse("# R\n# Script\n````sh\n```\n# inner\n````\n# After\n");
        assert_eq!(runbook.script.as_deref(), Some("```\n# inner\n"));
        assert_eq!(runbook.sections, vec!["Script", "After"]);
        let runbook = parse("# R\n# Script\n```sh\n~~~\n# inner\n```  \n# After\n");
        assert_eq!(runbook.sections, vec!["Script", "After"]);
        assert!(runbook.problems.is_empty());
    }

    #[test]
    fn unclosed_fence_is_a_problem() {
        let runbook = parse("# R\n# Script\n```sh\necho hi\n# History\n");
        assert_eq!(runbook.sections, vec!["Script"]);
        assert_eq!(runbook.problems.len(), 1);
        assert!(runbook.problems[0].contains("line 3"));
    }

    #[test]
    fn headings_need_a_space_and_column_zero() {
        let runbook = parse("# R\n#Script\n ## x\n  # Indented\n## Sub\n#\tTabbed\n#\n");
        assert_eq!(runbook.sections, vec!["Tabbed", ""]);
    }

    #[test]
    fn first_section_occurrence_wins() {
        let runbook =
            parse("# R\n# Script\n```sh\necho one\n```\n# Script\n```sh\necho two\n```\n");
        assert_eq!(runbook.script.as_deref(), Some("echo one\n"));
    }
}
