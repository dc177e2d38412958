//! The one error type of the public surface.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A boxed source error from a backend client.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Every failure the engine or a backend reports. Each variant maps to one wire [`ErrorCode`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No valid credentials.
    #[error("unauthorized: {0}")]
    Unauthorized(Cow<'static, str>),
    /// Authenticated, but not allowed (e.g. editing someone else's message).
    #[error("forbidden: {0}")]
    Forbidden(Cow<'static, str>),
    /// The caller is not a member of the conversation.
    #[error("not a member of conversation {0}")]
    NotMember(crate::ConversationId),
    /// The thing asked for does not exist.
    #[error("not found: {0}")]
    NotFound(Cow<'static, str>),
    /// Malformed or semantically invalid input.
    #[error("invalid: {0}")]
    Invalid(Cow<'static, str>),
    /// Content over the configured limit.
    #[error("too large: {size} bytes, limit {limit}")]
    TooLarge {
        /// Size of the rejected content in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// Over the per-user rate limit.
    #[error("rate limited")]
    RateLimited,
    /// A concurrent writer won (optimistic concurrency); retrying may succeed.
    #[error("conflict: {0}")]
    Conflict(Cow<'static, str>),
    /// A backend could not be reached or failed.
    #[error("{backend} unavailable: {source}")]
    Unavailable {
        /// Which backend (`"redis"`, `"scylla"`, …).
        backend: &'static str,
        /// What the client library said.
        #[source]
        source: BoxError,
    },
    /// The engine or a queue was shut down.
    #[error("shutting down")]
    Shutdown,
    /// A bug or an unexpected state.
    #[error("internal: {0}")]
    Internal(Cow<'static, str>),
}

impl Error {
    /// An [`Error::Invalid`].
    pub fn invalid(msg: impl Into<Cow<'static, str>>) -> Self {
        Self::Invalid(msg.into())
    }

    /// An [`Error::NotFound`].
    pub fn not_found(msg: impl Into<Cow<'static, str>>) -> Self {
        Self::NotFound(msg.into())
    }

    /// An [`Error::Forbidden`].
    pub fn forbidden(msg: impl Into<Cow<'static, str>>) -> Self {
        Self::Forbidden(msg.into())
    }

    /// An [`Error::Internal`].
    pub fn internal(msg: impl Into<Cow<'static, str>>) -> Self {
        Self::Internal(msg.into())
    }

    /// An [`Error::Unavailable`] wrapping a backend error.
    pub fn unavailable(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            backend,
            source: source.into(),
        }
    }

    /// Whether retrying the same operation may succeed (network blips, optimistic conflicts).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::Conflict(_) | Self::RateLimited
        )
    }

    /// The wire code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Unauthorized(_) => ErrorCode::Unauthorized,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::NotMember(_) => ErrorCode::NotMember,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Invalid(_) => ErrorCode::Invalid,
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            Self::RateLimited => ErrorCode::RateLimited,
            Self::Conflict(_) | Self::Unavailable { .. } | Self::Shutdown | Self::Internal(_) => {
                ErrorCode::Internal
            }
        }
    }

    /// The message shown to clients. Backend internals (connection strings, driver messages)
    /// are not leaked: those errors say only which backend failed.
    pub fn client_message(&self) -> String {
        match self {
            Self::Unavailable { backend, .. } => format!("{backend} backend unavailable"),
            Self::Internal(_) => "internal error".to_owned(),
            // The code travels next to the message: do not repeat it.
            Self::Unauthorized(m)
            | Self::Forbidden(m)
            | Self::NotFound(m)
            | Self::Invalid(m)
            | Self::Conflict(m) => m.to_string(),
            Self::TooLarge { size, limit } => {
                format!("content is {size} bytes; the limit is {limit}")
            }
            other => other.to_string(),
        }
    }
}

/// The `code` of an `error` frame / HTTP error body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// No or bad token (HTTP 401).
    Unauthorized,
    /// Not allowed (HTTP 403).
    Forbidden,
    /// Not a member of the conversation (HTTP 403).
    NotMember,
    /// Unknown conversation or message (HTTP 404).
    NotFound,
    /// Malformed or invalid input (HTTP 400).
    Invalid,
    /// Content over the limit (HTTP 413).
    TooLarge,
    /// Over the rate limit (HTTP 429).
    RateLimited,
    /// Server-side failure (HTTP 500).
    Internal,
}

impl ErrorCode {
    /// Every code, in declaration order (for counters and exhaustive tests).
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotMember,
        ErrorCode::NotFound,
        ErrorCode::Invalid,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Internal,
    ];

    /// The HTTP status for this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Unauthorized => 401,
            Self::Forbidden | Self::NotMember => 403,
            Self::NotFound => 404,
            Self::Invalid => 400,
            Self::TooLarge => 413,
            Self::RateLimited => 429,
            Self::Internal => 500,
        }
    }

    /// The snake_case wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotMember => "not_member",
            Self::NotFound => "not_found",
            Self::Invalid => "invalid",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Shorthand for `Result<T, chat_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod error_code_tests {
    use super::ErrorCode;

    /// A new variant must be added here (the match is exhaustive) and to `ErrorCode::ALL`.
    fn position(code: ErrorCode) -> usize {
        match code {
            ErrorCode::Unauthorized => 0,
            ErrorCode::Forbidden => 1,
            ErrorCode::NotMember => 2,
            ErrorCode::NotFound => 3,
            ErrorCode::Invalid => 4,
            ErrorCode::TooLarge => 5,
            ErrorCode::RateLimited => 6,
            ErrorCode::Internal => 7,
        }
    }

    #[test]
    fn all_lists_every_code_once_in_order() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(position(*code), i, "{code:?}");
        }
        assert_eq!(ErrorCode::ALL.len(), position(ErrorCode::Internal) + 1);
    }
}
