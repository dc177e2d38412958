//! What a transport tells the engine about a connection's credential: whose it is, when it
//! expires ([`Credential`], [`SessionOptions`]), and how a fresh token presented on the live
//! socket (`refresh`) is checked ([`TokenVerifier`]).

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;
use crate::id::UserId;

/// A verified credential: the user and, if it has one, the instant it stops being valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    /// Whose credential it is.
    pub user: UserId,
    /// Unix milliseconds at which it expires (a JWT's `exp` × 1000); `None`: never.
    pub expires_at: Option<u64>,
}

impl Credential {
    /// A credential of `user` that never expires (development mode, host sessions).
    pub fn new(user: UserId) -> Self {
        Self {
            user,
            expires_at: None,
        }
    }

    /// The same credential, expiring at `expires_at` (Unix milliseconds).
    pub fn expiring_at(mut self, expires_at: u64) -> Self {
        self.expires_at = Some(expires_at);
        self
    }
}

/// Checks a token presented on a live socket (the `refresh` command). A transport that knows
/// how its clients authenticate hands one to every session it connects
/// ([`SessionOptions::verifier`]); the engine then accepts a `refresh` whose token verifies and
/// names the session's user.
#[async_trait]
pub trait TokenVerifier: Send + Sync + Debug + 'static {
    /// The credential of `token`, or [`Error::Unauthorized`](crate::Error::Unauthorized) for a
    /// bad, expired or unsupported one.
    async fn verify(&self, token: &str) -> Result<Credential>;
}

/// A shared token verifier.
pub type DynTokenVerifier = Arc<dyn TokenVerifier>;

/// How [`Chat::connect_with`](crate::Chat::connect_with) sets a session up. The default (what
/// [`Chat::connect`](crate::Chat::connect) uses) never expires, cannot refresh and sends no
/// `session` frame.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct SessionOptions {
    /// Unix milliseconds at which the session's credential expires: from then on every command
    /// is refused with `unauthorized`, and the connection is closed with
    /// [`CloseReason::TokenExpired`](super::CloseReason::TokenExpired). `None`: never.
    pub expires_at: Option<u64>,
    /// Verifies the token of a `refresh` command; without one, `refresh` is `unauthorized`.
    pub verifier: Option<DynTokenVerifier>,
    /// Queue the `session` frame (who, which connection and node, expiry, limits) before any
    /// other frame.
    pub announce: bool,
}

impl SessionOptions {
    /// The defaults: no expiry, no refresh, no `session` frame.
    pub fn new() -> Self {
        Self::default()
    }

    /// Expires at `expires_at` (Unix milliseconds), or never for `None`.
    pub fn expires_at(mut self, expires_at: Option<u64>) -> Self {
        self.expires_at = expires_at;
        self
    }

    /// Accepts `refresh` commands whose token `verifier` accepts.
    pub fn verifier(mut self, verifier: DynTokenVerifier) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Sends the `session` frame first.
    pub fn announce(mut self) -> Self {
        self.announce = true;
        self
    }
}
