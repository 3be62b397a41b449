//! What can be wrong with a webhook body. The HTTP status and error code of each variant are
//! decided in one place, `routes::error`.

use thiserror::Error;

/// A request body the service refuses. Every message names the problem for a human and never
/// echoes secrets; `index` points at the entry at fault.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PayloadError {
    /// The media type is neither JSON nor form-urlencoded.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The body, or the `event` parameter, is not valid JSON (or has a duplicate key).
    #[error("{0}")]
    MalformedJson(String),
    /// The form body cannot be decoded, or repeats a field.
    #[error("{0}")]
    MalformedForm(String),
    /// Well-formed, but not a valid CMC webhook.
    #[error("{message}")]
    Invalid {
        message: String,
        index: Option<usize>,
    },
    /// The arrays of `event` hold more elements than `server.max_entries`.
    #[error("the batch has more than server.max_entries ({limit}) entries")]
    TooManyEntries { limit: usize },
}

impl PayloadError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        PayloadError::Invalid {
            message: message.into(),
            index: None,
        }
    }

    pub(crate) fn invalid_entry(index: usize, message: impl Into<String>) -> Self {
        PayloadError::Invalid {
            message: format!("entry {index}: {}", message.into()),
            index: Some(index),
        }
    }

    /// The index of the entry at fault, when one is.
    pub fn index(&self) -> Option<usize> {
        match self {
            PayloadError::Invalid { index, .. } => *index,
            _ => None,
        }
    }
}
