//! How Redis failures become [`chat_core::Error`]s: one mapping for every Redis backend.

use std::time::Duration;

use chat_core::id::ConversationId;
use chat_core::{Error, Result};
use redis::{Client, RedisError};

/// The `backend` of every [`Error::Unavailable`] the Redis backends return.
pub const BACKEND: &str = "redis";

/// Opens a client for `url` (`redis://[[user]:password@]host[:port][/db]`; `rediss://` is not
/// compiled in). Nothing is connected yet. [`Error::Invalid`] for a malformed URL.
pub fn client(url: &str) -> Result<Client> {
    Client::open(url).map_err(|e| Error::invalid(format!("invalid Redis URL: {e}")))
}

/// `err` as an [`Error::Unavailable`] of the `redis` backend (transient: worth retrying).
pub fn unavailable(err: impl Into<chat_core::error::BoxError>) -> Error {
    Error::unavailable(BACKEND, err)
}

/// The [`Error::Unavailable`] of an operation (`what`) that got no answer within `after`.
pub fn timed_out(what: &str, after: Duration) -> Error {
    unavailable(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what}: no answer from Redis within {after:?}"),
    ))
}

/// Maps an error of the `redis` client.
///
/// Error replies whose code is one of the SDK's script codes become the matching domain error,
/// so a Lua script can fail like any other backend would (the first word of the reply is the
/// code, the rest the detail):
///
/// | reply | error |
/// |---|---|
/// | `CHAT_NOT_FOUND <what>` | [`Error::NotFound`] |
/// | `CHAT_NOT_MEMBER <conversation id>` | [`Error::NotMember`] |
/// | `CHAT_FORBIDDEN <why>` | [`Error::Forbidden`] |
/// | `CHAT_INVALID <why>` | [`Error::Invalid`] |
/// | `CHAT_CONFLICT <why>` | [`Error::Conflict`] |
/// | `CHAT_INTERNAL <why>` | [`Error::Internal`] |
///
/// Everything else (connection, timeout, any other server error, an unexpected reply type) is
/// [`Error::Unavailable`] with `backend: "redis"`.
pub fn map_error(e: RedisError) -> Error {
    let detail = || e.detail().unwrap_or_default().to_owned();
    match e.code() {
        Some("CHAT_NOT_FOUND") => Error::not_found(detail()),
        Some("CHAT_NOT_MEMBER") => match detail().trim().parse::<ConversationId>() {
            Ok(id) => Error::NotMember(id),
            Err(_) => Error::internal(format!("bad CHAT_NOT_MEMBER reply: {e}")),
        },
        Some("CHAT_FORBIDDEN") => Error::forbidden(detail()),
        Some("CHAT_INVALID") => Error::invalid(detail()),
        Some("CHAT_CONFLICT") => Error::Conflict(detail().into()),
        Some("CHAT_INTERNAL") => Error::internal(detail()),
        _ => unavailable(e),
    }
}

/// Whether `err` says the connection (rather than the command) failed: the condition under
/// which [`RedisConnection::query`](crate::RedisConnection::query) tries a call once more.
pub fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_unrecoverable_error()
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::ErrorKind;

    // Error replies from a real server (the `CHAT_*` codes, NOSCRIPT, WRONGTYPE) are mapped in
    // `tests/connection.rs`: the client gives no way to build them here.

    #[test]
    fn client_failures_are_transient_unavailable() {
        for e in [
            RedisError::from((ErrorKind::Io, "broken pipe")),
            RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            RedisError::from((ErrorKind::UnexpectedReturnType, "not an integer")),
        ] {
            let mapped = map_error(e);
            assert!(
                matches!(
                    mapped,
                    Error::Unavailable {
                        backend: "redis",
                        ..
                    }
                ),
                "{mapped:?}"
            );
            assert!(mapped.is_transient());
        }
        let t = timed_out("PUBLISH", Duration::from_millis(5));
        assert!(matches!(
            t,
            Error::Unavailable {
                backend: "redis",
                ..
            }
        ));
        assert!(t.is_transient());
        assert!(t.to_string().contains("PUBLISH"), "{t}");
    }

    #[test]
    fn connection_errors_are_told_apart_from_command_errors() {
        assert!(is_connection_error(&RedisError::from(
            std::io::Error::from(std::io::ErrorKind::ConnectionReset)
        )));
        assert!(!is_connection_error(&RedisError::from((
            ErrorKind::UnexpectedReturnType,
            "not an integer"
        ))));
    }

    #[test]
    fn a_bad_url_is_invalid() {
        assert!(matches!(client("not a url"), Err(Error::Invalid(_))));
        assert!(client("redis://127.0.0.1:1/").is_ok());
    }
}
