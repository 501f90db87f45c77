//! Reading multi-document YAML into resources.

use std::path::Path;

use crate::{resource::Resource, ConfigError};

/// YAML parser limits. serde-saphyr's defaults (1,024 documents, 250,000 nodes) are too small
/// for a fleet's worth of Workloads in one file; callers bound the input's size instead (the
/// control plane's API refuses bodies over `--max-body-bytes`).
fn options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1_000_000;
    budget.max_nodes = 50_000_000;
    budget.max_events = 200_000_000;
    let mut o = serde_saphyr::Options::default();
    o.budget = Some(budget);
    o
}

/// Parse every document of `text` as plain JSON values (to store them as written).
pub fn parse_values(file: &str, text: &str) -> Result<Vec<serde_json::Value>, ConfigError> {
    serde_saphyr::from_multiple_with_options(text, options()).map_err(|e| syntax(file, e))
}

fn syntax(file: &str, e: serde_saphyr::Error) -> ConfigError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    ConfigError::Syntax {
        file: file.to_string(),
        line,
        column,
        message: first_line(&e.to_string()),
    }
}

/// Parse every document of `text`; `file` is only used in error messages.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Resource>, ConfigError> {
    serde_saphyr::from_multiple_with_options::<Resource>(text, options())
        .map_err(|e| syntax(file, e))
}

/// One document given as JSON (an agent's registration, say), checked as a file's would be;
/// an error names the field's path (`spec.ports.http`).
pub fn resource_from_json(file: &str, doc: &serde_json::Value) -> Result<Resource, ConfigError> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::invalid(file, 0, path, first_line(&e.into_inner().to_string()))
    })
}

/// Read and parse a file.
pub fn load_file(path: &Path) -> Result<Vec<Resource>, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        file: file.clone(),
        source,
    })?;
    parse_documents(&file, &text)
}

// saphyr renders a source snippet after the message; the location is reported separately.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_fleet_sized_file_parses() {
        // More documents and nodes than serde-saphyr's default budget allows.
        let doc = "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: w, namespace: n, labels: { app: a } }\nspec: { address: 10.0.0.1, environment: vm, locality: { region: r, zone: z } }\n";
        let text = vec![doc; 12_000].join("---\n");
        assert_eq!(super::parse_documents("f", &text).unwrap().len(), 12_000);
        assert_eq!(super::parse_values("f", &text).unwrap().len(), 12_000);
    }
}
