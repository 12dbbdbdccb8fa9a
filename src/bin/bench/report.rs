//! The results table (figure, baseline, ratio, goal, verdict) printed at the end of a run, and
//! the same rows written as JSON with the machine they were measured on (`--json PATH`).
#![forbid(unsafe_code)]

use std::path::Path;

use serde_json::{json, Value};

use crate::error::BenchError;

/// One measured figure next to its baseline and goal.
#[derive(Debug, Clone)]
pub struct Row {
    /// Short name, e.g. `sync_echo_overhead`.
    pub name: String,
    /// The measured value, in `unit`.
    pub value: f64,
    /// The same-run baseline it is compared with, if any.
    pub baseline: Option<f64>,
    pub unit: &'static str,
    /// value / baseline, when that is what the goal bounds.
    pub ratio: Option<f64>,
    /// The goal, in words (`<= 1.5 ms`).
    pub goal: String,
    pub met: Option<bool>,
    /// Anything else worth keeping (medians of parts, counts).
    pub detail: Value,
}

fn number(value: f64, unit: &str) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0} {unit}")
    } else {
        format!("{value:.3} {unit}")
    }
}

/// The table as text.
pub fn table(rows: &[Row]) -> String {
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                number(r.value, r.unit),
                r.baseline.map_or_else(|| "-".into(), |b| number(b, r.unit)),
                r.ratio.map_or_else(|| "-".into(), |x| format!("{x:.2}x")),
                r.goal.clone(),
                match r.met {
                    Some(true) => "pass".into(),
                    Some(false) => "FAIL".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let header = ["figure", "value", "baseline", "ratio", "goal", "result"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |row: &[String; 6]| {
        row.iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(&header);
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

/// Writes the rows and the machine line as JSON to `path`.
pub fn write_json(path: &Path, machine: &str, rows: &[Row]) -> Result<(), BenchError> {
    let figures: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "value": r.value,
                "baseline": r.baseline,
                "unit": r.unit,
                "ratio": r.ratio,
                "goal": r.goal,
                "met": r.met,
                "detail": r.detail,
            })
        })
        .collect();
    let doc = json!({
        "machine": machine,
        "measured_at": chrono::Utc::now().to_rfc3339(),
        "figures": figures,
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| BenchError::Server(e.to_string()))?;
    std::fs::write(path, text).map_err(BenchError::io(format!("write {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lines_up_and_says_pass_or_fail() {
        let rows = [Row {
            name: "x".into(),
            value: 1.25,
            baseline: Some(0.5),
            unit: "ms",
            ratio: Some(2.5),
            goal: "<= 3x".into(),
            met: Some(true),
            detail: Value::Null,
        }];
        let text = table(&rows);
        assert!(text.starts_with("figure"));
        assert!(text.contains("1.250 ms  0.500 ms  2.50x  <= 3x  pass"));
    }
}
