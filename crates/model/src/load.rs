//! Reading multi-document YAML into resources.

use std::path::Path;

use crate::{resource::Resource, ConfigError};

/// Parse every document of `text`; `file` is only used in error messages.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Resource>, ConfigError> {
    serde_saphyr::from_multiple::<Resource>(text).map_err(|e| {
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
