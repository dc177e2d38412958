//! `refresh`: a fresh token on the live socket moves the session's expiry.

use crate::engine::chat::Chat;
use crate::engine::registry::ConnHandle;
use crate::error::{Error, Result};
use crate::protocol::Event;
use crate::time::now_ms;

/// Longest token accepted (a JWT is a few hundred bytes).
const MAX_TOKEN_BYTES: usize = 8 * 1024;

impl Chat {
    /// Check: the transport gave the session a verifier, the token verifies (`Unauthorized`)
    /// and names the session's user (`Forbidden`); apply: the expiry moves (refused if the
    /// session or the new token expired already); reply: `refreshed`.
    pub(super) async fn refresh(&self, conn: &ConnHandle, token: String) -> Result<()> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(Error::Unauthorized(
                format!("malformed token: it must be 1..={MAX_TOKEN_BYTES} bytes").into(),
            ));
        }
        let verifier = conn.verifier.as_ref().ok_or_else(|| {
            Error::Unauthorized("this connection's transport cannot verify tokens".into())
        })?;
        let credential = verifier.verify(&token).await?;
        if credential.user != conn.user {
            return Err(Error::forbidden(
                "the token is for another user: a socket keeps its user",
            ));
        }
        self.inner
            .expiries
            .refresh(conn, credential.expires_at, now_ms())?;
        self.reply(
            conn,
            Event::Refreshed {
                expires_at: credential.expires_at,
            },
        )
        .await;
        Ok(())
    }
}
