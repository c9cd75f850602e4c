//! Printing a report as kubectl does: an aligned table (the default), `-o json` or `-o yaml`.

use serde::Serialize;

use crate::PluginError;

/// `-o`: how a report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, as `kubectl get` prints.
    Table,
    /// The report as JSON.
    Json,
    /// The report as YAML.
    Yaml,
}

/// A report a subcommand prints: serializable for `-o json|yaml`, and its own table.
pub trait Report: Serialize {
    /// The report as people read it.
    fn table(&self) -> String;
}

/// The report in `format`, ending with a newline.
pub fn render(report: &impl Report, format: Format) -> Result<String, PluginError> {
    match format {
        Format::Table => Ok(report.table()),
        Format::Json => serde_json::to_string_pretty(report)
            .map(|text| text + "\n")
            .map_err(|error| PluginError::Output(error.to_string())),
        Format::Yaml => {
            serde_yaml_ng::to_string(report).map_err(|error| PluginError::Output(error.to_string()))
        }
    }
}

/// Columns aligned as `kubectl get` aligns them: each as wide as its widest cell, three spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|title| title.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (at, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if at + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}   "));
            }
        }
        text.trim_end().to_owned() + "\n"
    };
    let mut text = line(header.to_vec());
    for row in rows {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    text
}

/// `value`, or `-` for nothing.
pub fn or_dash(value: Option<impl ToString>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_under_their_titles() {
        let text = table(
            &["NAME", "PHASE"],
            &[
                vec!["orders-db".into(), "Frozen".into()],
                vec!["a".into(), "Replicating".into()],
            ],
        );
        assert_eq!(
            text,
            "NAME        PHASE\norders-db   Frozen\na           Replicating\n"
        );
    }
}
