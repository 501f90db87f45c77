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
    #[error("{file}:{line}:{column}: {message}")]
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
    #[error("{file}:{line}: {field}: {message}")]
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
