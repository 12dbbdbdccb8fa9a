//! Runbook text for the test servers: a builder for the documented markdown format, and a reader
//! of the `# History` section the server appends to.

/// Builds the markdown of a runbook in the documented format.
#[derive(Clone, Debug)]
pub struct Runbook {
    name: String,
    env: Vec<(String, String)>,
    inputs: Vec<String>,
    claims: Vec<String>,
    script: String,
    history: bool,
}

impl Runbook {
    /// A runbook named `name` (its H1) whose `# Script` block holds `script` verbatim.
    pub fn new(name: &str, script: &str) -> Runbook {
        Runbook {
            name: name.to_string(),
            env: Vec::new(),
            inputs: Vec::new(),
            claims: Vec::new(),
            script: script.to_string(),
            history: true,
        }
    }

    /// Adds a required environment variable.
    pub fn env(mut self, var: &str, description: &str) -> Runbook {
        self.env.push((var.to_string(), description.to_string()));
        self
    }

    /// Adds an `Input:` path.
    pub fn input(mut self, path: &str) -> Runbook {
        self.inputs.push(path.to_string());
        self
    }

    /// Adds a `# Required Claims` line such as `roles: admin`.
    pub fn claim(mut self, line: &str) -> Runbook {
        self.claims.push(line.to_string());
        self
    }

    /// Leaves out the `# History` section.
    pub fn without_history(mut self) -> Runbook {
        self.history = false;
        self
    }

    pub fn render(&self) -> String {
        let mut md = format!(
            "# {}\nA runbook written by the integration tests.\n\n",
            self.name
        );
        md.push_str("# Environment Requirements\n```yaml\n");
        for (var, description) in &self.env {
            md.push_str(&format!("{var}: {description}\n"));
        }
        md.push_str("```\n\n# File System Requirements\n```yaml\n");
        if self.inputs.is_empty() {
            md.push_str("Input:\n");
        } else {
            md.push_str("Input:\n");
            for input in &self.inputs {
                md.push_str(&format!("- {input}\n"));
            }
        }
        md.push_str("```\n\n");
        if !self.claims.is_empty() {
            md.push_str("# Required Claims\n```yaml\n");
            for line in &self.claims {
                md.push_str(line);
                md.push('\n');
            }
            md.push_str("```\n\n");
        }
        md.push_str("# Script\n```sh\n");
        md.push_str(&self.script);
        if !self.script.ends_with('\n') {
            md.push('\n');
        }
        md.push_str("```\n");
        if self.history {
            md.push_str("\n# History\n");
        }
        md
    }
}

/// Splits the `# History` section of a runbook into its entries (each starting after `### `).
pub fn history_entries(markdown: &str) -> Vec<String> {
    let Some(pos) = markdown.find("\n# History") else {
        return Vec::new();
    };
    let section = &markdown[pos + "\n# History".len()..];
    section
        .split("\n### ")
        .skip(1)
        .map(|s| s.to_string())
        .collect()
}

/// `(time, exit code, run id)` from an entry's first line `<time> | Exit Code: N | Run: <id>`.
pub fn entry_header(entry: &str) -> (String, i64, Option<String>) {
    let first = entry.lines().next().unwrap_or_default();
    let parts: Vec<&str> = first.split(" | ").collect();
    let time = parts.first().copied().unwrap_or_default().to_string();
    let code = parts
        .iter()
        .find_map(|p| p.strip_prefix("Exit Code: "))
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or_else(|| panic!("no exit code in history heading {first:?}"));
    let run = parts
        .iter()
        .find_map(|p| p.strip_prefix("Run: "))
        .map(|r| r.trim().to_string());
    (time, code, run)
}
