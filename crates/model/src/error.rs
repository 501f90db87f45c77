//! Config errors. Every error names the file, the line and the field, so that an operator can
//! go straight to the offending place.

/// Why a set of resources was refused. Refusal is always whole: nothing is half-applied.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Io {
        /// The file.
        file: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed or does not match the schema (unknown field, wrong type, bad value).
    #[error("{file}{}: {message}", place(*line, *column))]
    Syntax {
        /// The file.
        file: String,
        /// 1-based line (0 when unknown).
        line: u64,
        /// 1-based column (0 when unknown).
        column: u64,
        /// What is wrong; names the field.
        message: String,
    },
    /// The documents parse but do not make sense together (missing reference, duplicates...).
    #[error("{file}{}: {field}: {message}", place(*line, 0))]
    Invalid {
        /// The file.
        file: String,
        /// 1-based line of the offending field (0 when unknown).
        line: u64,
        /// Dotted path of the field, prefixed by the resource it belongs to.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(
        file: &str,
        line: u64,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            file: file.to_string(),
            line,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// `:LINE:COLUMN`, `:LINE` or nothing, as far as the place is known (0 is unknown): an
/// error about the whole file, or a document given as JSON, prints no `:0:0`.
fn place(line: u64, column: u64) -> String {
    match (line, column) {
        (0, _) => String::new(),
        (l, 0) => format!(":{l}"),
        (l, c) => format!(":{l}:{c}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unknown line or column is left out rather than printed as 0.
    #[test]
    fn a_place_is_printed_as_far_as_it_is_known() {
        let syntax = |line, column| ConfigError::Syntax {
            file: "f.yaml".into(),
            line,
            column,
            message: "no documents".into(),
        };
        assert_eq!(syntax(0, 0).to_string(), "f.yaml: no documents");
        assert_eq!(syntax(3, 0).to_string(), "f.yaml:3: no documents");
        assert_eq!(syntax(3, 7).to_string(), "f.yaml:3:7: no documents");
        let invalid = |line| ConfigError::invalid("f.yaml", line, "Service shop/a: spec", "bad");
        assert_eq!(invalid(0).to_string(), "f.yaml: Service shop/a: spec: bad");
        assert_eq!(
            invalid(4).to_string(),
            "f.yaml:4: Service shop/a: spec: bad"
        );
    }
}
